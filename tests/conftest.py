import pytest
import torch

from soe import get_expert, list_experts

torch.set_num_threads(2)


def tiny(name: str, seed: int = 0):
    return get_expert(name).tiny(seed).eval()


def batch_for(expert, batch_size=2, seconds=1.0, seed=0):
    return expert.dummy_batch(batch_size, seconds=seconds, generator=torch.Generator().manual_seed(seed))


ALL_EXPERTS = list_experts()


@pytest.fixture(params=ALL_EXPERTS)
def expert_name(request):
    return request.param
