"""The private internals mmlit reads or sets (``mmlit/compat/``), each on the installed library: a test fails here
when an upgrade moves one. (aiohttp's is held by tests/data/test_remote.py, on a real StreamReader.)"""

from __future__ import annotations

import socket
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from mmlit.compat.lightning import (ddp_finds_unused_parameters, grad_scaler, one_data_parallel_dimension,
                                    steps_processed, wandb_continue, wandb_run, wandb_without_unset_settings)
from mmlit.compat.torch import (DCP_INDEX, SafeFileSystemReader, allow_retained_compiled_backward, default_store,
                                read_dcp_index, reduce_gradients_manually)
from mmlit.loggers import WandbLogger


def test_ddp_strategy_says_whether_it_finds_unused_parameters():
    assert ddp_finds_unused_parameters(DDPStrategy(find_unused_parameters=True))
    assert not ddp_finds_unused_parameters(DDPStrategy())


def test_a_model_parallel_strategy_takes_one_data_parallel_dimension():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy()
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("auto", "auto")  # (what it sets)
    one_data_parallel_dimension(strategy, 4)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)


def test_the_fp16_grad_scaler_of_the_precision_plugin():
    scaler = torch.amp.GradScaler("cpu")
    trainer = type("T", (), {"precision_plugin": MixedPrecision("16-mixed", "cpu", scaler=scaler)})()
    assert grad_scaler(trainer) is scaler
    trainer.precision_plugin = MixedPrecision("bf16-mixed", "cpu")
    assert grad_scaler(trainer) is None


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_steps_a_fit_has_processed(tmp_path):
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
    assert steps_processed(trainer) == 3


def test_a_wandb_logger_continues_a_run_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert wandb_run(logger) is None  # not started: reading it must not start it
    wandb_continue(logger, "mmlitcompat1")
    assert logger.version == "mmlitcompat1"
    assert logger.experiment.id == "mmlitcompat1" and wandb_run(logger) is logger.experiment
    logger.experiment.finish()


def test_lightnings_wandb_logger_still_passes_an_unset_anonymous_setting_and_mmlits_does_not(tmp_path, capsys):
    from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

    plain = LightningWandbLogger(save_dir=str(tmp_path), offline=True)
    assert plain._wandb_init["anonymous"] is None  # (else wandb_without_unset_settings can go)
    wandb_without_unset_settings(plain)
    assert "anonymous" not in plain._wandb_init
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert "anonymous" not in logger._wandb_init
    logger.experiment.finish()
    assert "anonymous setting" not in capsys.readouterr().err


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_default_store_and_ddps_reducer_flag(process_group):
    store = default_store()
    store.set("mmlit/compat", "1")
    assert store.get("mmlit/compat") == b"1"
    wrapper = DistributedDataParallel(torch.nn.Linear(2, 1))
    assert wrapper.require_backward_grad_sync is True  # what no_sync() toggles: the attribute is still there
    reduce_gradients_manually(wrapper)
    assert wrapper.require_backward_grad_sync is False and wrapper.require_forward_param_sync is True


def test_compiled_backward_buffers_are_not_donated():
    import torch._functorch.config

    allow_retained_compiled_backward()
    assert torch._functorch.config.donated_buffer is False


def test_a_checkpoint_index_that_torch_writes_reads_without_pickle(tmp_path):
    """torch.distributed.checkpoint names its index ``DCP_INDEX`` and pickles into it only what ``read_dcp_index``
    allows (tensors of several dtypes, an optimizer's non-tensor entries); ``SafeFileSystemReader`` loads what torch
    saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import filesystem

    assert DCP_INDEX == filesystem._metadata_fn
    weights = {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "n": torch.tensor(3)}
    groups = [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"]}]
    state = {"state_dict": weights, "optimizer_0": {"param_groups": groups}}
    with warnings.catch_warnings():  # (torch says it saves and loads in one process, as asked)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
        index = read_dcp_index(tmp_path)
        assert {"state_dict.w", "state_dict.b", "optimizer_0.param_groups.0.betas"} <= set(index.state_dict_metadata)
        loaded = {"state_dict": {k: torch.empty_like(v) for k, v in weights.items()}}
        dcp.load(loaded, storage_reader=SafeFileSystemReader(tmp_path), no_dist=True)
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in weights.items())


def test_the_library_notices_mmlit_filters_are_still_emitted_and_only_they_are_filtered(tmp_path):
    """Lightning still emits each notice that ``quiet_library_notices`` filters (else its filter should go), and
    after it the notices are gone while another FutureWarning and another Lightning info line still show."""
    import logging

    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities import rank_zero_info
    from lightning.pytorch.utilities._pytree import _tree_flatten

    from mmlit.compat import notices

    class Records(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    def notices_seen() -> tuple[bool, bool, bool, bool, bool]:
        lines.clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if filtered:
                notices.quiet_library_notices()
            _tree_flatten(1)
            warnings.warn("another notice", FutureWarning)
            pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       default_root_dir=str(tmp_path)).fit(BoringModel())  # (its default ModelCheckpoint: the tip)
            rank_zero_info("another info line")
        messages = [str(w.message) for w in seen]
        return (notices.LEAF_SPEC in messages, "another notice" in messages,
                any(line.startswith(notices.LITLOGGER_TIP) for line in lines),
                any(line.startswith(notices.LITMODELS_TIP) for line in lines), "another info line" in lines)

    lines: list[str] = []
    logger, handler = logging.getLogger(notices._LIGHTNING_INFO), Records()
    before, level = list(logger.filters), logger.level
    logger.filters[:] = [f for f in before if not isinstance(f, notices._Without)]  # (an in-process mmlit run's)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        filtered = False
        assert notices_seen() == (True, True, True, True, True)
        filtered = True
        assert notices_seen() == (False, True, False, False, True)
    finally:
        logger.filters[:] = before
        logger.removeHandler(handler)
        logger.setLevel(level)
