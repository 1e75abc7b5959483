"""``model.compile`` and the speed options: regional compilation finds the repeated blocks, a compiled run trains with a
loss-based and a gradient-based objective and its checkpoint loads into an uncompiled model; channels-last and
activation checkpointing change no output and no gradient."""

from __future__ import annotations

import pytest
import torch

from mmlit.cli import MMLitCLI, main
from mmlit.compile import Compile, compile_modules, repeated_blocks
from mmlit.models import TimmImageEncoder, TransformerTextEncoder

from .conftest import tiny_recipe, write_recipe


def test_regional_compilation_compiles_each_repeated_block():
    text = TransformerTextEncoder(vocab_size=50, dim=16, depth=3, heads=2, max_length=8)
    assert repeated_blocks(text) == list(text.layers.layers)
    image = TimmImageEncoder("test_vit", dim=16, image_size=32, model_kwargs={"img_size": 32, "patch_size": 8})
    assert repeated_blocks(image) == list(image.model.blocks)
    head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))  # no repeats: whole
    compiled = compile_modules([text, head], [], Compile())
    assert compiled == [*text.layers.layers, head] and all(m._compiled_call_impl is not None for m in compiled)


def _same_outputs_and_gradients(a: torch.nn.Module, b: torch.nn.Module, inputs: torch.Tensor) -> None:
    b.load_state_dict(a.state_dict())
    outputs = [m(inputs) for m in (a, b)]
    for x, y in zip(*outputs):
        torch.testing.assert_close(x, y)
    for m, out in zip((a, b), outputs):
        out[1].square().sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_channels_last_and_checkpointing_change_no_output_or_gradient():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    for options in ({"channels_last": True}, {"checkpointing": True}):
        plain = TimmImageEncoder("test_byobnet", dim=16, image_size=32, feature_index=2)
        _same_outputs_and_gradients(plain, TimmImageEncoder("test_byobnet", dim=16, image_size=32, feature_index=2,
                                                            **options), images)
    ids = torch.randint(1, 50, (3, 7))
    ids[0, 4:] = 0
    _same_outputs_and_gradients(TransformerTextEncoder(vocab_size=50, dim=16, depth=2, heads=2, max_length=8),
                                TransformerTextEncoder(vocab_size=50, dim=16, depth=2, heads=2, max_length=8,
                                                       checkpointing=True), ids)


def test_inductor_compiled_blocks_match_eager_outputs_and_gradients():
    """Inductor itself (generated C++ on the CPU), on the smallest backbone part with repeated blocks."""
    torch.manual_seed(0)
    eager = TransformerTextEncoder(vocab_size=50, dim=16, depth=2, heads=2, max_length=8)
    compiled = TransformerTextEncoder(vocab_size=50, dim=16, depth=2, heads=2, max_length=8)
    compiled.load_state_dict(eager.state_dict())
    assert compile_modules([compiled], [], Compile()) == list(compiled.layers.layers)
    ids = torch.randint(1, 50, (3, 7))
    ids[0, 4:] = 0
    for a, b in zip(eager(ids), compiled(ids)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for module in (eager, compiled):
        module(ids)[1].square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("value,backend", [("true", "inductor"), ("{backend: aot_eager}", "aot_eager"), ("false", None)])
def test_model_compile_takes_true_as_the_defaults_on_the_command_line(soc, tmp_path, value, backend):
    """``--model.compile true`` (what a Lightning user types) compiles with the defaults, as ``{}`` does."""
    recipe = write_recipe(tiny_recipe(soc, tmp_path, tasks=["vqa"], logger=False), tmp_path / "r.yaml")
    cli = MMLitCLI(args=["--config", str(recipe), "--model.compile", value], run=False)
    compiled = [m for m in cli.model.modules() if m._compiled_call_impl is not None]
    assert len(compiled) >= (3 if backend else 0) and (backend is not None or not compiled)  # encoders, fusion, head


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_compiled_run_trains_and_its_checkpoint_loads_into_an_uncompiled_model(soc, tmp_path):
    """Through the CLI with ``aot_eager``: Dynamo's graphs and AOT autograd's backward, without inductor's code
    generation (5 minutes cold on 2 cores here for these graphs; the test above runs inductor on a small part)."""
    def recipe(name: str, validate: bool = True, **model) -> dict:
        r = tiny_recipe(soc, tmp_path / name, tasks=["vqa", "contrastive"], logger=False, max_steps=3,
                        limit_val_batches=1 if validate else 0, num_sanity_val_steps=0)
        r["model"].update(model)
        return r

    # loss-based (and its compiled evaluation), and one backward per task through the compiled blocks (evaluating
    # again would only trace the same graphs in eval mode again)
    for objective, validate in (("static", True), ("pcgrad", False)):
        compiled = recipe(objective, validate, compile={"backend": "aot_eager"}, objective=objective)
        main(["fit", "--config", str(write_recipe(compiled, tmp_path / "c.yaml"))])
    # The uncompiled model as the CLI builds it: its keys are those of a fit's checkpoint (training adds none), and
    # the strict load below checks them again; a fit of it only to read them was a quarter of this test's time
    eager_recipe = write_recipe(recipe("eager", objective="static"), tmp_path / "e.yaml")
    eager = MMLitCLI(args=["--config", str(eager_recipe)], run=False).model.state_dict()
    compiled = torch.load(tmp_path / "static" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert list(compiled) == list(eager) and not any("_orig_mod" in key for key in compiled)
    assert all(torch.isfinite(v).all() for v in compiled.values() if v.is_floating_point())
    # the compiled run's checkpoint into an uncompiled model (strict), and evaluated
    assert main(["validate", "--config", str(tmp_path / "e.yaml"), "--ckpt_path",
                 str(tmp_path / "static" / "checkpoints" / "last.ckpt")]) in (0, None)
