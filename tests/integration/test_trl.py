"""The README says ``TrainbusCallback`` works in TRL's ``SFTTrainer``: here it does, on the tiny model.

A TRL user's script (prompt/completion data, a LoRA ``peft_config``, ``SFTConfig``) plus the one
line the README gives; the run arrives on the bus, and training is exactly what it is without it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from nats.aio.client import Client as NATS
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from producers import TrainbusCallback
from producers.config import DataConfig, TinyModel
from producers.task.data import answer_json, build_prompt, read_examples
from producers.task.labels import load_labels
from producers.task.model import build_tiny_model
from producers.task.sampledata import write_sample_data
from producers.task.tokenizer import build_byte_tokenizer
from runtime.bus.server import RunningServer
from runtime.bus.stream import replay
from runtime.settings import BusSettings, Settings
from schemas import Event, run_events

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads on a shared 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The sample risk data in TRL's prompt/completion format."""
    folder = tmp_path_factory.mktemp("trl-data")
    write_sample_data(folder)
    examples, _ = read_examples(folder / "train.jsonl", load_labels(str(REPO / "configs/labels.yaml")))
    system = DataConfig().system_prompt
    return Dataset.from_list(
        [{"prompt": build_prompt(ex, system), "completion": answer_json(ex)} for ex in examples[: STEPS * 4]]
    )


def sft_trainer(dataset: Dataset, output_dir: Path) -> SFTTrainer:
    tokenizer = build_byte_tokenizer()
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=STEPS,
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_length=256,
        save_strategy="no",
        seed=7,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return SFTTrainer(
        model=build_tiny_model(TinyModel(hidden_size=64, intermediate_size=128), tokenizer, seed=7),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )


def losses(trainer: SFTTrainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def stored_events(url: str, run_id: str) -> list[Event]:
    async def read() -> list[Event]:
        nc = NATS()
        await nc.connect(url)
        try:
            return [d.event async for d in replay(nc.jetstream(), run_events(run_id)) if d.event is not None]
        finally:
            await nc.close()

    return asyncio.run(read())


def test_sft_trainer_with_the_callback_streams_the_run_and_trains_the_same(
    nats_server: RunningServer, tmp_path: Path, dataset: Dataset
) -> None:
    plain = sft_trainer(dataset, tmp_path / "plain")
    plain.train()

    streamed = sft_trainer(dataset, tmp_path / "streamed")
    TrainbusCallback.attach(streamed, run_id="trl-sft", settings=Settings(bus=BusSettings(url=nats_server.url)))
    streamed.train()

    assert len(losses(plain)) == STEPS
    assert losses(streamed) == losses(plain)  # same seed and data: the callback changes nothing
    events = stored_events(nats_server.url, "trl-sft")
    kinds = [e.type for e in events]
    assert kinds[0] == "run.started" and kinds[-1] == "run.finished", kinds
    started, finished = events[0], events[-1]
    assert started.adapter == "lora" and started.max_steps == STEPS
    assert started.trainable_parameters < started.total_parameters
    assert finished.status == "completed" and finished.step == STEPS
    steps = [e for e in events if e.type == "train.step"]
    assert [s.step for s in steps] == list(range(1, STEPS + 1))
    assert [s.loss for s in steps] == pytest.approx(losses(streamed), rel=1e-6)
