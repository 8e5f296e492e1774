"""`vllm-expertflow quantize` refuses bad input in one line before it starts the other
environment. (The quantization itself runs end to end in
tests/integration/test_quantized_moe_method.py.)"""

import json
import shutil
from argparse import Namespace

import torch

from vllm_expertflow.tools import quantize
from vllm_expertflow.tools.engine_runs import DEMO_MODEL


def args_for(model=DEMO_MODEL, group_size=64, calibration=None, out=None, tmp_path=None):
    return Namespace(
        model=model,
        method="gptq",
        bits=4,
        group_size=group_size,
        calibration=calibration or [DEMO_MODEL / "heldout_pydoc.txt"],
        samples=8,
        seq_len=128,
        out=out or tmp_path / "out",
    )


def refusal(args, capsys) -> str:
    assert quantize.run(args) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    return message


def test_group_size_must_divide_the_expert_dimensions(tmp_path, capsys):
    message = refusal(args_for(group_size=96, tmp_path=tmp_path), capsys)
    assert "--group-size 96 must divide hidden_size (256), moe_intermediate_size (128)" in message


def test_group_size_is_checked_against_a_mixtral_style_expert_width(tmp_path, capsys):
    # Mixtral has no moe_intermediate_size: every MLP is MoE, its width is intermediate_size.
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96}
    (model / "config.json").write_text(json.dumps(config))
    message = refusal(args_for(model=model, group_size=64, tmp_path=tmp_path), capsys)
    assert "--group-size 64 must divide hidden_size (64), intermediate_size (96)" in message


def test_missing_calibration_text_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    message = refusal(args_for(calibration=[missing], tmp_path=tmp_path), capsys)
    assert str(missing) in message


def test_an_already_quantized_checkpoint_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (model / "config.json").write_text(json.dumps(config))
    assert "already quantized" in refusal(args_for(model=model, tmp_path=tmp_path), capsys)


def test_a_missing_quantization_environment_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(quantize.QUANT_PYTHON_ENV, str(tmp_path / "no-python"))
    assert "run ./setup.sh" in refusal(args_for(tmp_path=tmp_path), capsys)
    assert not (tmp_path / "out").exists()


def test_dequantize_packed_matches_the_quantization_formula():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from vllm_expertflow.tools.quantize import dequantize_packed

    rows, cols, group = 16, 128, 32
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (rows, cols), generator=generator)
    zeros = torch.randint(0, 16, (rows, cols // group), generator=generator)
    scale = (torch.rand(rows, cols // group, generator=generator) + 0.1).to(torch.bfloat16)
    # compressed-tensors stores signed int4 (-8..7); zero points packed along rows.
    packed = pack_to_int32((codes - 8).to(torch.int8), 4)
    packed_zeros = pack_to_int32((zeros - 8).to(torch.int8), 4, packed_dim=0)
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=group, symmetric=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    weight = dequantize_packed(scheme, (rows, cols), packed, scale, packed_zeros)

    expected = (codes - zeros.repeat_interleave(group, dim=1)) * scale.float().repeat_interleave(
        group, dim=1
    )
    torch.testing.assert_close(weight.float(), expected, rtol=1e-2, atol=1e-2)
