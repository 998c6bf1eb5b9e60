"""torchrun-style runs on CPU: 2 processes over gloo, spawned by the test."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastmem.train import train
from fastmem.train.distributed import full_adapter_state
from tests.train.tiny import adapter_state, make_samples, tiny_config, tiny_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        # One sample: the global batch [0, 0] gives both ranks the same sample, so the averaged
        # gradient equals the single-process gradient.
        one = train(tiny_config(distributed=mode, max_steps=4, lr=1e-2), make_samples(1), model=tiny_model())
        torch.save(full_adapter_state(one.model), f"{out_dir}/one_rank{rank}.pt")
        sharded = any(hasattr(p, "full_tensor") for p in one.model.parameters())  # DTensor under FSDP2
        torch.save(sharded, f"{out_dir}/sharded_rank{rank}.pt")
        # Two samples, one per rank, SW: gradients, first errors and stop decisions are shared.
        two = train(tiny_config(distributed=mode, objective="sw", sw_window=2, max_steps=4, out=f"{out_dir}/two"),
                    make_samples(2), model=tiny_model())
        torch.save(full_adapter_state(two.model), f"{out_dir}/two_rank{rank}.pt")
        torch.save(two.metrics, f"{out_dir}/two_metrics_rank{rank}.pt")
        # Steps that skip backward (no OT token active, or recalled) between steps that run it.
        from fastmem.train import stop_rule

        original = stop_rule.StopRule.decide
        calls = []

        def every_other_step_skips(self, signal, batch, all_active):
            calls.append(1)
            decision = original(self, signal, batch, all_active)
            return stop_rule.StepDecision(False, False, "test_skip") if len(calls) % 2 else decision

        stop_rule.StopRule.decide = every_other_step_skips
        skipping = train(tiny_config(distributed=mode, max_steps=4), make_samples(2), model=tiny_model())
        stop_rule.StopRule.decide = original
        torch.save(full_adapter_state(skipping.model), f"{out_dir}/skip_rank{rank}.pt")
        # The plateau stop: each rank sees its own sample's loss, both decide from the mean.
        flat = train(tiny_config(distributed=mode, max_steps=20, lr=1e-9, plateau_patience=2), make_samples(2),
                     model=tiny_model())
        torch.save(flat.summary["steps"], f"{out_dir}/plateau_steps_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, mode: str):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True,
                       start_method="spawn")
    return {name: torch.load(tmp_path / f"{name}.pt") for name in
            ("sharded_rank0", "one_rank0", "one_rank1", "two_rank0", "two_rank1",
             "two_metrics_rank0", "two_metrics_rank1", "skip_rank0", "skip_rank1", "plateau_steps_rank0",
             "plateau_steps_rank1")}


def _assert_same(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys() and a
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_on_gloo_match_one_process(tmp_path, mode):
    got = _spawn(tmp_path, mode)
    assert got["sharded_rank0"] == (mode == "fsdp2")
    single = train(tiny_config(max_steps=4, lr=1e-2), make_samples(1), model=tiny_model())
    _assert_same(got["one_rank0"], got["one_rank1"])
    _assert_same(got["one_rank0"], adapter_state(single.model), exact=False)
    assert any(t.abs().sum() > 0 for n, t in got["one_rank0"].items() if "lora_B" in n)
    _assert_same(got["two_rank0"], got["two_rank1"])
    _assert_same(got["skip_rank0"], got["skip_rank1"])
    assert got["plateau_steps_rank0"] == got["plateau_steps_rank1"] == 3
    decisions = [[row["decision"] for row in got[f"two_metrics_rank{r}"]] for r in (0, 1)]
    assert decisions[0] == decisions[1]
    summary = (tmp_path / "two" / "summary.json").read_text()
    assert '"world_size": 2' in summary
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()
