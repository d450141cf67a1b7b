"""``save_pretrained`` of an attached model writes the base model only; the adapter goes through save_drlora.

Both directions: a process that never imports drlora_kernels loads the saved base cleanly (no
unexpected or missing keys) and gets the base model's logits; and that base plus the adapter
checkpoint gives back the attached model's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from drlora_kernels.integrations.checkpoint import load_drlora, save_drlora
from drlora_kernels.integrations.transformers import attach_drlora, detach_drlora, get_drlora

from .tiny_models import build, randomize_lora, small_config, token_batch

_CLEAN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_warning()
    model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model.eval()(ids).logits
    torch.save(logits, sys.argv[3])
    assert not any(m.startswith("drlora_kernels") for m in sys.modules), "drlora_kernels was imported"
    print(json.dumps({k: sorted(map(str, v)) for k, v in info.items()}))
    """
)


def test_save_pretrained_writes_the_base_only_and_reloads_without_this_package(tmp_path):
    model = build("olmoe")
    ids = token_batch()
    with torch.no_grad():
        base_logits = model(ids).logits
    handle = get_drlora(attach_drlora(model, small_config(), total_steps=8))
    randomize_lora(handle)
    with torch.no_grad():
        adapted_logits = model(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "base")
    with safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "drlora" in k]
    assert "drlora" not in (tmp_path / "base" / "config.json").read_text()
    save_drlora(model, tmp_path / "adapter")

    # a process that never imports drlora_kernels: clean load, the base model's logits
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "clean_load.py"
    script.write_text(_CLEAN_LOAD)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "ids.pt"),
         str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert "UNEXPECTED" not in proc.stderr and "unexpected" not in proc.stderr.lower(), proc.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), base_logits, rtol=0, atol=0)

    # the other direction: the saved base + the adapter checkpoint = the attached model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    load_drlora(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted_logits, rtol=0, atol=0)


def test_detach_restores_the_save_list_and_the_model(tmp_path):
    model = build("olmoe")
    before = set(model._keys_to_ignore_on_save or ())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    attach_drlora(model, small_config())
    assert any("drlora" in k for k in model._keys_to_ignore_on_save)
    detach_drlora(model)
    assert set(model._keys_to_ignore_on_save or ()) == before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not [k for k in model.state_dict() if "drlora" in k]
    attach_drlora(model, small_config())  # attachable again
