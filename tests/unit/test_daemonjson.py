"""daemon.json merge: keeps every key, adds the nvidia default runtime, stable on re-run."""

import json

import pytest

from gpufleet.model import daemon_json as daemonjson


def test_merge_keeps_other_keys_and_order():
    current = {"log-driver": "json-file", "log-opts": {"max-size": "10m"}, "debug": True}
    merged = daemonjson.merge(current)
    assert list(merged)[:3] == ["log-driver", "log-opts", "debug"]
    assert merged["log-opts"] == {"max-size": "10m"} and merged["debug"] is True
    assert merged["runtimes"]["nvidia"] == {"args": [], "path": "nvidia-container-runtime"}
    assert merged["default-runtime"] == "nvidia"
    assert merged["exec-opts"] == ["native.cgroupdriver=cgroupfs"]


def test_merge_is_idempotent_and_semantic():
    once = daemonjson.merge({"runtimes": {"other": {"path": "/x"}}})
    assert daemonjson.merge(once) == once
    # formatting does not matter, content does
    reparsed = daemonjson.parse(json.dumps(once, indent=1))
    assert daemonjson.merge(reparsed) == reparsed
    assert once["runtimes"]["other"] == {"path": "/x"}


def test_existing_nvidia_runtime_with_absolute_path_is_kept():
    current = {"runtimes": {"nvidia": {"path": "/usr/bin/nvidia-container-runtime",
                                       "runtimeArgs": []}}, "default-runtime": "nvidia"}
    merged = daemonjson.merge(current, cgroup_driver=None)
    assert merged == current


def test_user_exec_opts_survive_and_cgroup_driver_is_replaced():
    merged = daemonjson.merge({"exec-opts": ["native.umask=normal",
                                             "native.cgroupdriver=systemd"]})
    assert merged["exec-opts"] == ["native.umask=normal", "native.cgroupdriver=cgroupfs"]


def test_cgroup_driver_none_leaves_exec_opts_alone():
    assert "exec-opts" not in daemonjson.merge({}, cgroup_driver=None)


@pytest.mark.parametrize("text,needle", [
    ('{"a": 1,}', "is not valid JSON (line 1"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_broken_files_are_reported(text, needle):
    with pytest.raises(daemonjson.DaemonJsonError) as e:
        daemonjson.parse(text)
    assert needle in str(e.value) and "untouched" in str(e.value)


def test_missing_or_empty_is_empty_config():
    assert daemonjson.parse(None) == {} and daemonjson.parse("  \n") == {}


def test_render_is_four_space_json_with_newline():
    assert daemonjson.render({"a": {"b": 1}}) == '{\n    "a": {\n        "b": 1\n    }\n}\n'
