"""sundae-train: CLI surface (help, lazy imports) and config loading (TOML + --set, strict)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib
from click.testing import CliRunner
from comfyui_sundae.trainer import config as C
from comfyui_sundae.trainer.cli import main

COMMANDS = ("vqgan", "latents", "prior", "sample", "inpaint", "env")


def test_cli_import_is_light():
    """--help must be instant: importing the CLI module pulls in neither torch nor numpy, and of
    sundae_lib only the torch-free modules the config needs (the [sampling] table is the
    library's SamplingDefaults)."""
    code = (
        "import sys, comfyui_sundae.trainer.cli as c; "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
        "lib = [m for m in sys.modules if m.startswith('comfyui_sundae.sundae_lib.')]; "
        "bad += [m for m in lib if m.rsplit('.', 1)[1] not in ('prior_metadata', 'codec_spec')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_group_help_lists_commands_and_ends_with_examples():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0, res.output
    for name in COMMANDS:
        assert f"  {name}" in res.output
    tail = res.output.rstrip().splitlines()
    examples_at = max(i for i, line in enumerate(tail) if line.strip() == "Examples:")
    assert examples_at > len(tail) - 15  # the examples are the last block
    assert "torchrun --nproc_per_node=8 -m comfyui_sundae.trainer prior" in res.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_ends_with_examples(name):
    res = CliRunner().invoke(main, [name, "--help"])
    assert res.exit_code == 0, res.output
    lines = res.output.rstrip().splitlines()
    ex = [i for i, line in enumerate(lines) if line.strip() in ("Examples:", "Example:")]
    assert ex, res.output
    # every line after the header is an example command (or its continuation / a note)
    body = [line for line in lines[ex[-1] + 1 :] if line.strip()]
    assert body and all(line.startswith("  ") for line in body), body
    assert any("sundae-train " + name in line or "comfyui_sundae.trainer " + name in line for line in body)
    # \b keeps the example lines unwrapped: the continuation lines survive verbatim
    if name == "prior":
        assert any(line.strip().startswith("torchrun --nproc_per_node=8 -m comfyui_sundae.trainer prior") for line in body)


def test_parse_override_literals():
    assert C.parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)
    assert C.parse_override("run.progress=false") == (["run", "progress"], False)
    assert C.parse_override("sampling.temperature=[1.0, 0.7]") == (["sampling", "temperature"], [1.0, 0.7])
    assert C.parse_override("run.out_dir=runs/x") == (["run", "out_dir"], "runs/x")  # not TOML -> str
    assert C.parse_override('model="tiny"') == (["model"], "tiny")
    with pytest.raises(C.ConfigError, match="key.path=value"):
        C.parse_override("optim.lr")


def test_overrides_apply_and_preset_name_becomes_table():
    cfg, raw = C.load_stage("prior", None, ["model=tiny", "model.dim=64", "optim.lr=2", "optim.betas=[0.5, 0.9]"])
    assert cfg.model == {"preset": "tiny", "dim": 64}
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # int widened to float
    assert cfg.optim.betas == (0.5, 0.9)
    assert raw["optim"]["lr"] == 2


def test_unknown_key_lists_valid_keys():
    with pytest.raises(C.ConfigError) as err:
        C.load_stage("prior", None, ["optim.lrr=1e-3"])
    msg = str(err.value)
    assert "optim.lrr" in msg
    for key in ("batch_size", "grad_accum", "lr", "warmup_steps", "ema_decay"):
        assert key in msg
    with pytest.raises(C.ConfigError, match="unknown key.*nope.*valid keys there: codec, data, loss, model, optim, run, sampling"):
        C.load_stage("prior", None, ["nope.x=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lr=fast", r"optim.lr expects float, got 'fast' \(str\)"),
        ("run.max_steps=1.5", r"run.max_steps expects int"),
        ("run.progress=1", r"run.progress expects bool"),
        ("optim.betas=[0.9]", r"optim.betas expects array of 2 float"),
        ("data=3", r"\[data\] must be a table"),
        ("run.precision=fp8", r"run.precision = 'fp8' is not allowed; use one of \['auto', 'fp32', 'bf16', 'fp16'\]"),
        ("run.device=gpu", r"run.device = 'gpu'"),
        ("loss.region_corruption=2", r"loss.region_corruption = 2.0 must lie in \[0, 1\]"),
    ],
)
def test_bad_values_are_config_errors(override, pattern):
    with pytest.raises(C.ConfigError, match=pattern):
        C.load_stage("prior", None, [override])


def test_cli_reports_config_errors_as_usage_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["prior", "--set", "optim.lrr=1", "--print-config"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert "valid keys there" in res.output and "batch_size" in res.output
    res = runner.invoke(main, ["prior", "--set", "optim.lr=abc", "--print-config"])
    assert res.exit_code == 2 and "optim.lr expects float" in res.output
    # library tables ([model] -> PriorConfig fields) are checked before any data is touched
    res = runner.invoke(main, ["prior", "-c", "mnist-pixels", "--set", "model.dimm=3", "--print-config"])
    assert res.exit_code == 2 and "model.dimm" in res.output and "heads" in res.output
    res = runner.invoke(main, ["vqgan", "-c", "mnist-vq", "--set", "loss.disc_stat=3", "--print-config"])
    assert res.exit_code == 2 and "loss.disc_stat" in res.output and "disc_start" in res.output
    res = runner.invoke(main, ["prior", "-c", "no-such-preset"])
    assert res.exit_code == 2 and "mnist-pixels" in res.output and "ffhq256" in res.output
    res = runner.invoke(main, ["vqgan", "-c", "mnist-pixels", "--print-config"])
    assert res.exit_code == 2 and "no [vqgan] stage" in res.output


@pytest.mark.parametrize("stage", ["prior", "vqgan"])
def test_training_commands_share_their_options_and_shortcuts(tmp_path, stage):
    """prior and vqgan take the same options; the shortcuts become run.* overrides."""
    import tomllib

    runner = CliRunner()
    res = runner.invoke(main, [stage, "--help"])
    assert res.exit_code == 0
    for option in ("--config", "--set", "--resume", "--out", "--max-steps", "--device", "--print-config"):
        assert option in res.output, (stage, option)
    text = " ".join(res.output.split())  # click wraps the help at the terminal width
    assert "run.device=... (auto, cpu, cuda, cuda:N)" in text and "step-N" in text
    res = runner.invoke(main, [stage, "--out", str(tmp_path / "o"), "--max-steps", "7", "--device", "cpu",
                               "--set", "run.seed=5", "--print-config"])
    assert res.exit_code == 0, res.output
    run = tomllib.loads(res.output)["run"]
    assert (run["out_dir"], run["max_steps"], run["device"], run["seed"]) == (str(tmp_path / "o"), 7, "cpu", 5)


def test_pipeline_stage_selection_and_single_stage_files(tmp_path):
    single = tmp_path / "one.toml"
    single.write_text('[optim]\nlr = 0.5\n[run]\nout_dir = "x"\n')
    cfg, _ = C.load_stage("prior", str(single), [])
    assert cfg.optim.lr == 0.5 and cfg.run.out_dir == "x"
    pipe = tmp_path / "pipe.toml"
    pipe.write_text('[prior.optim]\nlr = 0.25\n[latents]\nvqgan = "v.safetensors"\n')
    assert C.load_stage("prior", str(pipe), [])[0].optim.lr == 0.25
    assert C.load_stage("latents", str(pipe), ["batch_size=3"])[0].batch_size == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('x = 1\n[prior.optim]\nlr = 1\n')
    with pytest.raises(C.ConfigError, match="beside the stage tables"):
        C.load_stage("prior", str(bad), [])
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\n")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load_stage("prior", str(broken), [])


def test_resolved_config_toml_round_trip():
    cfg, _ = C.load_stage("prior", "mnist-vq", ["sampling.temperature=[0.9, 0.5]", "model.depth=[1, [1, 2, 1], 1]"])
    text = C.to_toml(C.config_to_dict(cfg))
    again = C.build_dataclass(C.TrainPriorConfig, tomllib.loads(text))
    assert again.sampling == cfg.sampling and again.optim == cfg.optim and again.run == cfg.run
    assert again.model["depth"] == [1, [1, 2, 1], 1]
    # non-bare keys and special floats survive too
    odd = {"a b": {"x": float("inf"), "s": 'q"uote', "t": [1, 2]}}
    assert tomllib.loads(C.to_toml(odd)) == odd


@pytest.mark.parametrize("preset", ["ffhq256", "ffhq1024", "imagenet256", "mnist-pixels", "mnist-vq"])
def test_shipped_presets_validate(preset):
    from comfyui_sundae.sundae_lib import PriorConfig, VQGANConfig
    from comfyui_sundae.sundae_lib.vq_losses import VQLossConfig

    assert preset in C.preset_names()
    doc = C.read_config_file(C.find_config_file(preset))
    assert "prior" in doc
    cfg, _ = C.load_stage("prior", preset, [])
    name, overrides = C.validate_model_table(cfg.model, PriorConfig)
    if name:
        PriorConfig.preset(name, **overrides)
    if "vqgan" in doc:
        vcfg, _ = C.load_stage("vqgan", preset, [])
        vname, voverrides = C.validate_model_table(vcfg.model, VQGANConfig)
        VQGANConfig.preset(vname, **voverrides)
        VQLossConfig.from_dict(vcfg.loss)
    if "latents" in doc:
        C.load_stage("latents", preset, [])


def test_mnist_presets_point_at_the_training_split():
    for preset in ("mnist-pixels", "mnist-vq"):
        cfg, _ = C.load_stage("prior", preset, [])
        if preset == "mnist-pixels":
            assert cfg.data.path == "data/mnist_train_4k.npz"
            assert C.resolve_input_path(cfg.data.path, what="data.path").is_file()
        assert cfg.model.get("class_dropout", 0) > 0
    vq, _ = C.load_stage("vqgan", "mnist-vq", [])
    assert vq.model["preset"] == "mnist-f4" and vq.run.export == "mnist-vq-f4.safetensors"
    lat, _ = C.load_stage("latents", "mnist-vq", [])
    assert lat.vqgan.endswith(vq.run.out_dir.split("/")[-1] + "/" + vq.run.export)
    pr, _ = C.load_stage("prior", "mnist-vq", [])
    assert pr.data.path == lat.out_dir and pr.run.export == "mnist-vq.safetensors"
