import pytest

import soe.plugin.registry as registry
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


def _fake_entry_points(monkeypatch, name, cls, loads: list):
    class FakeEntryPoint:
        def load(self):
            loads.append(name)
            return cls

    FakeEntryPoint.name = name
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEntryPoint()] if group == "soe.experts" else [])


def test_entry_point_plugins_are_discovered_lazily(monkeypatch):
    class PluginExpert(Expert):
        name, modality = "plugin-expert", "audio"

    loads = []
    _fake_entry_points(monkeypatch, "plugin-expert", PluginExpert, loads)
    assert "plugin-expert" in list_experts() and loads == []  # listing names imports nothing
    assert get_expert("plugin-expert").modality == "audio" and loads == ["plugin-expert"]


def test_builtins_register_through_the_entry_point_group():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="soe.experts")}
    assert eps["wan2.1"] == "soe.experts.wan:WanExpert" and eps["ace-step"] == "soe.experts.ace_step:AceStepV1Expert"
    assert {"wan2.1", "wan2.2-ti2v", "ace-step", "ace-step-1.5", "stable-audio-open"} <= set(eps)


def test_entry_point_name_must_match_the_class_name(monkeypatch):
    class Misnamed(Expert):
        name, modality = "other-name", "audio"

    _fake_entry_points(monkeypatch, "plugin-expert", Misnamed, [])
    with pytest.raises(ValueError, match="'plugin-expert'.*'other-name'"):
        get_expert("plugin-expert")
