import pytest

import soe.registry as registry
from soe import Expert, get_expert, list_experts, register_expert


def test_builtins_are_registered():
    names = list_experts()
    assert {"wan2.1", "ace-step-1.5"} <= set(names)
    assert get_expert("wan2.1").modality == "video"


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as info:
        get_expert("wan2.2x")
    msg = str(info.value)
    assert "unknown expert 'wan2.2x'" in msg and "wan2.1" in msg and "ace-step-1.5" in msg


def test_register_rejects_non_experts_and_nameless_classes():
    with pytest.raises(TypeError):
        register_expert(object)

    class Nameless(Expert):
        pass

    with pytest.raises(ValueError, match="name"):
        register_expert(Nameless)


def test_entry_point_plugins_are_discovered_lazily(monkeypatch):
    class FakeEntryPoint:
        def load(self):
            class PluginExpert(Expert):
                name, modality = "plugin-expert", "audio"
            return PluginExpert

    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "soe.experts" else [])
    assert get_expert("plugin-expert").modality == "audio"
