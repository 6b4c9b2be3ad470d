"""The whole soe expert contract, one pytest test per property, in three lines."""
from soe.testing import ExpertContractTests
from soe_toy_audio import ToyAudioExpert


class TestToyAudioExpert(ExpertContractTests):
    expert = ToyAudioExpert
