"""Multi-node DDP as a cluster runs it: two torchrun "nodes" on localhost, one result, the same weights on both."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from clitools import FAST, REPO

pytestmark = pytest.mark.e2e
LIMITS = ("trainer.limit_train_batches=2", "trainer.limit_val_batches=2")


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """One sha256 over every tensor in key order: equal digests mean equal weights and buffers."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rank_weights(out_dir: str) -> Any:
    """A callback that writes each rank's weight digest after fit (the training run imports it via _target_)."""
    import lightning as L  # here, not at the top: collecting this file should not cost Lightning's import

    class RankWeights(L.Callback):
        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            facts = {
                "digest": weights_digest(pl_module.state_dict()),
                "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes,
            }
            Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(facts))

    return RankWeights()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path) -> dict[str, Any]:
    """Two torchrun agents (one process each) rendezvous on localhost, as two nodes of a cluster would."""
    cwd = tmp_path_factory.mktemp("multinode")
    dumps = cwd / "ranks"
    dumps.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        str(REPO / "train.py"),
        "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=2",
        f"data.root={imagefolder}", "save.publish=false", "test=false", *FAST, *LIMITS,
        "+callbacks.rank_weights._target_=test_multinode_cli.rank_weights",
        f"+callbacks.rank_weights.out_dir={dumps}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(Path(__file__).parent)]),
    }
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    nodes = [subprocess.Popen(command, cwd=cwd, env=env, **pipes) for _ in range(2)]  # two agents, as two nodes
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
    codes = [node.returncode for node in nodes]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n=====\n".join(out[-5000:] for out in outputs)
    return {"cwd": cwd, "dumps": dumps}


def test_two_nodes_train_one_model_with_identical_weights_on_both_ranks(two_nodes: dict[str, Any]) -> None:
    ranks = {p.name: json.loads(p.read_text()) for p in sorted(two_nodes["dumps"].glob("rank*.json"))}
    assert sorted(ranks) == ["rank0.json", "rank1.json"]
    assert all(r["world_size"] == 2 and r["num_nodes"] == 2 for r in ranks.values())
    assert ranks["rank0.json"]["digest"] == ranks["rank1.json"]["digest"]


def test_two_nodes_leave_one_result_whose_checkpoint_holds_those_weights(two_nodes: dict[str, Any]) -> None:
    results = list((two_nodes["cwd"] / "logs").rglob("results.json"))
    assert len(results) == 1  # rank 0 alone writes
    result = json.loads(results[0].read_text())
    assert result["status"] == "ok" and [row["epoch"] for row in result["history"]] == [0, 1]
    checkpoints = Path(result["run_dir"]) / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    rank0 = json.loads((two_nodes["dumps"] / "rank0.json").read_text())
    assert weights_digest(last["state_dict"]) == rank0["digest"]
    # Each rank is its own launch with its own Hydra log folder, but only rank 0's run holds checkpoints.
    assert {p.parent for p in (two_nodes["cwd"] / "logs").rglob("*.ckpt")} == {checkpoints}
