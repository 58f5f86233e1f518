"""``[cluster]`` (SPEC §9): the SPEC's example loads, and each broken key is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import ConfigError, load

SPEC_EXAMPLE = """
[cluster]
node = "edge-a"
engine = ["nats://10.0.1.1:4222", "nats://10.0.1.2:4222", "nats://10.0.1.3:4222"]
lease_seconds = 5
"""


def load_text(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load(path)


def test_without_a_cluster_section_the_node_is_alone(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    assert not cfg.cluster.enabled and cfg.cluster.engine == []


def test_the_spec_example_loads(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, SPEC_EXAMPLE)
    assert cfg.cluster.enabled and cfg.cluster.node == "edge-a"
    assert len(cfg.cluster.engine) == 3 and cfg.cluster.lease_seconds == 5


@pytest.mark.parametrize(("text", "named"), [
    ('[cluster]\nnode = "edge a"\nengine = ["nats://10.0.1.1:4222"]\n', "cluster.node"),
    ('[cluster]\nnode = "edge.a"\nengine = ["nats://10.0.1.1:4222"]\n', "cluster.node"),
    ('[cluster]\nengine = ["nats://10.0.1.1:4222"]\n', "cluster.node"),
    ('[cluster]\nnode = "edge-a"\n', "cluster.engine"),
    ('[cluster]\nnode = "edge-a"\nengine = ["http://10.0.1.1:4222"]\n', "cluster.engine[0]"),
    ('[cluster]\nnode = "edge-a"\nengine = ["nats://10.0.1.1:4222", "nats://10.0.1.2"]\n', "cluster.engine[1]"),
    ('[cluster]\nnode = "edge-a"\nengine = ["nats://10.0.1.1:4222"]\nlease_seconds = 0.5\n', "lease_seconds"),
    ('[cluster]\nnode = "edge-a"\nengine = ["nats://10.0.1.1:4222"]\nleases = 5\n', "leases"),
])
def test_a_broken_cluster_key_is_named(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_text(tmp_path, text)
