"""The configuration reference is generated from the code and must not go stale."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

from model_service.config import Settings


def test_configuration_reference_is_up_to_date():
    """docs/configuration.md == what scripts/gen_config_docs.py renders from Settings and the Nacos policy."""
    result = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docs/configuration.md is stale; run `make docs`\n{result.stderr[-4000:]}"


def test_every_setting_is_documented_and_readme_names_only_real_flags():
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in reference
        assert f"`MODEL_SERVICE_{name.upper()}`" in reference
    # the README's short table must not name flags or variables that do not exist
    readme = (ROOT / "README.md").read_text()
    flags = {"--" + n.replace("_", "-") for n in Settings.model_fields}
    variables = {"MODEL_SERVICE_" + n.upper() for n in Settings.model_fields}
    for flag, variable in re.findall(r"^\| `(--[a-z0-9-]+)` \| `(MODEL_SERVICE_[A-Z0-9_]+)` \|", readme, re.M):
        assert flag in flags, f"README documents an unknown flag {flag}"
        assert variable in variables, f"README documents an unknown variable {variable}"
