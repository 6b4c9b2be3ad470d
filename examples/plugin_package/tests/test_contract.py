"""The whole soe expert contract, one pytest test per property, in three lines."""
from soe_toy_audio import ToyAudioExpert

from soe.testing import ExpertContractTests


class TestToyAudioExpert(ExpertContractTests):
    expert = ToyAudioExpert
