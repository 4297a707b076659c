"""Build configuration: typed flow parameters, prefect.yaml parameters validate, keys follow parameters."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pixelface.config import BuildConfig, BuildOptions, StageParams
from storage.keys import artifact_key

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_parameters_validate():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    nightly = deps["nightly"]
    # a module path (a file path would load the module under another name, which Dask workers cannot unpickle)
    from prefect.utilities.importtools import import_object

    from flows.build import build_dataset
    assert import_object(nightly["entrypoint"].split("#")[0].strip()) is build_dataset
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    cfg = BuildConfig.model_validate(nightly["parameters"]["config"])
    assert cfg.stages.decode.min_modulation == 12.0 and cfg.workers == 2


def test_config_is_frozen_and_strict():
    cfg = BuildConfig(raw="r", store="s")
    with pytest.raises(ValidationError):
        cfg.raw = "x"
    with pytest.raises(ValidationError):
        BuildConfig(raw="r", store="s", bogus=1)
    with pytest.raises(ValidationError):
        BuildConfig.model_validate({"stages": {"decode": {"min_modulation": -1}}})
    opts = BuildOptions.from_config(cfg, "b1")
    assert BuildOptions.model_validate_json(opts.model_dump_json()) == opts  # JSON round trip (flow parameter)
    assert len(opts.model_dump_json()) < 512_000


def test_only_the_stage_own_parameters_enter_its_key():
    a, b = StageParams(), StageParams.model_validate({"texture": {"occlusion_tol_mm": 2.0}})
    raw = {"raw": "0" * 40}
    assert artifact_key("decode", "1", a.decode, raw) == artifact_key("decode", "1", b.decode, raw)
    assert artifact_key("texture", "1", a.texture, raw) != artifact_key("texture", "1", b.texture, raw)


def test_user_template_files_are_hashed_into_the_registration_key(tmp_path):
    from kernels.template import default_template
    from pixelface.config import load_config, with_template_hash
    from storage.keys import params_hash
    from storage.template_io import write_template
    from tasks.sample_stages import load_template

    files = [tmp_path / n for n in ("t.ply", "lm.json", "parts.json")]
    write_template(default_template(2000), *files)
    tpl = {"mesh": str(files[0]), "landmarks": str(files[1]), "parts": str(files[2])}
    cfg = with_template_hash(load_config(overrides={"build": {"stages": {"registration": {"template": tpl}}}}).build)
    reg = cfg.stages.registration
    assert reg.template.sha256 and load_template(reg.template).n_vertices > 1900
    key = params_hash(reg)
    # a changed file gives another key, and a stage configured with the old hash refuses it
    files[2].write_text(files[2].read_text().replace('"version": 1', '"version": 1 '))
    assert params_hash(with_template_hash(cfg.model_copy(update={"stages": cfg.stages.model_copy(update={
        "registration": reg.model_copy(update={"template": reg.template.model_copy(update={"sha256": None})})})})
    ).stages.registration) != key
    with pytest.raises(ValueError, match="changed since the build was configured"):
        load_template(reg.template)
    with pytest.raises(ValueError, match="give all of mesh, landmarks and parts"):
        load_config(overrides={"build": {"stages": {"registration": {"template": {"mesh": str(files[0])}}}}})


def test_user_template_jaw_file_is_loaded_and_hashed(tmp_path):
    from kernels.template import default_template
    from pixelface.config import load_config, with_template_hash
    from storage.keys import params_hash
    from storage.template_io import write_template
    from tasks.sample_stages import load_template

    t = default_template(2000)
    assert t.jaw is not None
    files = [tmp_path / n for n in ("t.ply", "lm.json", "parts.json", "jaw.json")]
    write_template(t, *files[:3], jaw_path=files[3])
    base = {"mesh": str(files[0]), "landmarks": str(files[1]), "parts": str(files[2])}

    def reg(tpl):
        return with_template_hash(load_config(overrides={"build": {"stages": {"registration": {"template": tpl}}}})
                                  .build).stages.registration

    without, with_jaw = reg(base), reg({**base, "jaw": str(files[3])})
    assert load_template(without.template).jaw is None
    loaded = load_template(with_jaw.template)
    assert loaded.jaw is not None and without.template.sha256 != with_jaw.template.sha256
    assert params_hash(without) != params_hash(with_jaw)
    with pytest.raises(ValueError, match="jaw file belongs to a user template"):
        load_config(overrides={"build": {"stages": {"registration": {"template": {"jaw": str(files[3])}}}}})


def test_register_from_neutral_from_the_command_line_and_config(tmp_path):
    import argparse

    from flows.build_cli import add_build_arguments, build_config_from_args

    p = argparse.ArgumentParser()
    add_build_arguments(p)
    base = ["--raw", str(tmp_path), "--store", str(tmp_path / "s")]
    assert build_config_from_args(p.parse_args(base)).register_from_neutral is True  # the default
    assert build_config_from_args(p.parse_args(base + ["--register-from-neutral"])).register_from_neutral is True
    assert build_config_from_args(p.parse_args(base + ["--no-register-from-neutral"])).register_from_neutral is False
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("build:\n  register_from_neutral: false\n")
    cfg = build_config_from_args(p.parse_args(base + ["--config", str(cfg_file)]))
    assert cfg.register_from_neutral is False  # the flag's absence does not override the file
    from pixelface.config import BuildOptions

    assert BuildOptions.from_config(cfg).register_from_neutral is False
    cfg = build_config_from_args(p.parse_args(base + ["--config", str(cfg_file), "--register-from-neutral"]))
    assert BuildOptions.from_config(cfg).register_from_neutral is True  # the flag overrides the file
