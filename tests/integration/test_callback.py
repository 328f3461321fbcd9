"""The callback in someone else's Trainer, and proof that publishing does not change training."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from nats.aio.client import Client as NATS
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from producers import TrainbusCallback
from producers.config import RunConfig
from producers.run.callback import open_bus
from producers.run.train import build_trainer, prepare
from runtime.bus.connect import connect, resolve_target
from runtime.bus.server import RunningServer
from runtime.bus.stream import replay
from runtime.publish.sinks import Stamper
from runtime.settings import BusSettings, Settings, load_config
from schemas import Heartbeat, run_events


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 32, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_two_lines_in_a_plain_trainer_stream_the_run(nats_server: RunningServer, tmp_path: Path) -> None:
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        logging_steps=2,
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
    # the two lines a user adds:
    settings = Settings(bus=BusSettings(url=nats_server.url))
    TrainbusCallback.attach(trainer, run_id="plain-hf", settings=settings)
    trainer.train()

    async def read() -> list[str]:
        nc = NATS()
        await nc.connect(nats_server.url)
        types = [d.event.type async for d in replay(nc.jetstream(), run_events("plain-hf")) if d.event is not None]
        await nc.close()
        return types

    types = asyncio.run(read())
    assert types[0] == "run.started" and types[-1] == "run.finished"
    assert types.count("train.step") == 3 and types.count("checkpoint") == 2


def _losses_and_weights(
    cfg: RunConfig, run_id: str, with_bus: bool, url: str
) -> tuple[list[float], dict[str, torch.Tensor]]:
    prep = prepare(cfg, run_id=run_id)
    callbacks: list[TrainerCallback] = []
    if with_bus:
        callbacks.append(
            TrainbusCallback(run_id, settings=load_config(Settings, None, [f"bus.url={url}"]), heartbeat_seconds=0.05)
        )
    trainer = build_trainer(prep, callbacks)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    return losses, weights


def test_the_bus_does_not_change_what_is_trained(nats_server: RunningServer, tmp_path: Path) -> None:
    """Same seed and config: plain Trainer vs with the live callback — same losses, same adapter."""
    overrides = [
        f"training.output_dir={tmp_path / 'runs'}",
        f"data.train_file={tmp_path / 'data/train.jsonl'}",
        f"data.validation_file={tmp_path / 'data/validation.jsonl'}",
        "training.max_steps=12",
        "training.logging_steps=1",
        "training.eval_steps=6",
        "training.save_steps=6",
        "data.max_eval_samples=16",
    ]
    cfg = load_config(RunConfig, Path(__file__).resolve().parents[2] / "configs/tiny.yaml", overrides, environ={})
    cfg.data.labels_file = str(Path(__file__).resolve().parents[2] / "configs/labels.yaml")
    plain_losses, plain_weights = _losses_and_weights(cfg, "fidelity-plain", False, nats_server.url)
    bus_losses, bus_weights = _losses_and_weights(cfg, "fidelity-bus", True, nats_server.url)
    assert len(plain_losses) == 12
    assert max(abs(a - b) for a, b in zip(plain_losses, bus_losses, strict=True)) <= 1e-6
    assert plain_weights.keys() == bus_weights.keys()
    for name, value in plain_weights.items():
        assert torch.allclose(value, bus_weights[name], atol=1e-7), name


def test_a_run_without_a_bus_stops_the_server_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `trainbus train` with no bus configured starts an embedded nats-server for the run; it must
    # not outlive the run, and the events must still be in its store for the next command.
    monkeypatch.delenv("NATS_URL", raising=False)
    settings = Settings(state_dir=str(tmp_path / ".trainbus"))
    publisher = open_bus("no-bus-run", settings, tmp_path / "outbox.jsonl", None)
    server = publisher.target.server
    assert server is not None and server.process.poll() is None
    Stamper(publisher, "no-bus-run").emit(Heartbeat, step=0, phase="starting")
    stats = publisher.close()
    assert stats.published == 1 and stats.outbox_pending == 0
    assert server.process.poll() is not None, "the embedded nats-server outlived the run"

    async def stored() -> int:
        target = resolve_target(settings, announce=False)  # a new embedded server on the same store
        try:
            nc = await connect(target, settings, name="test-reader")
            try:
                return len([d async for d in replay(nc.jetstream(), run_events("no-bus-run"))])
            finally:
                await nc.close()
        finally:
            assert target.server is not None
            target.server.stop()

    assert asyncio.run(stored()) == 1
