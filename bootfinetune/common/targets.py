"""Model strings and targets: what a DSPy model string names, and whether a target loads here.

A DSPy LM names the model to finetune through provider prefixes (`openai/local:/models/tiny`,
`huggingface/org/model`); a model this package finetuned is named `openai/bootfinetune:{dir}`.
A target (a Hugging Face hub id or a model directory) is checked by reading its config only.

A leaf: it imports nothing of ours (transformers and huggingface_hub only when a check runs).
"""

from __future__ import annotations

from pathlib import Path

MODEL_PREFIXES = ("openai/", "hosted_vllm/", "huggingface/", "local:", "bootfinetune:")
"""Prefixes a DSPy model string may carry before the model directory (stripped in this order)."""


def model_path(model: str) -> str:
    """The directory (or hub id) a DSPy model string names.

    >>> model_path("openai/local:/models/tiny"), model_path("openai/bootfinetune:runs/x/models/all")
    ('/models/tiny', 'runs/x/models/all')
    """
    for prefix in MODEL_PREFIXES:
        if model.startswith(prefix):
            model = model[len(prefix):]
    return model


def finetuned_model_id(model_dir: str | Path) -> str:
    """The DSPy model string of a finetuned export: `openai/bootfinetune:{dir}`."""
    return f"openai/bootfinetune:{model_dir}"


def check_target(target: str, trust_remote_code: bool = False) -> str | None:
    """None when `target` names a model that loads here; else one problem telling a path typo from a hub id
    that cannot be fetched (no network, not in the cache) or does not exist.

    A target is taken as a local path when it exists, starts with /, ./, ../ or ~, or its parent folder
    exists; otherwise as a Hugging Face hub id. Only the config is read (no weights).
    """
    import difflib
    import os

    path = Path(target).expanduser()
    local = (path.exists() or target.startswith(("/", "./", "../", "~"))
             or ("/" in target and path.parent != Path(".") and path.parent.is_dir()))
    if local:
        if not path.is_dir():
            siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
            close = difflib.get_close_matches(path.name, siblings, n=1)
            hint = f" Did you mean {str(path.parent / close[0])!r}?" if close else ""
            return (f"target={target!r}: no such directory.{hint} Fix the path, or give a Hugging Face hub id "
                    f"(e.g. 'Qwen/Qwen2.5-0.5B-Instruct').")
        if not (path / "config.json").exists():
            return (f"target={target!r}: a directory without config.json; point it at a model saved with "
                    f"save_pretrained (config.json, weights, tokenizer).")
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # a config.json transformers cannot read: broken JSON, unknown model_type...
            if "trust_remote_code" in str(e):
                return (f"target={target!r}: the directory ships its own model code; pass trust_remote_code=True "
                        f"if you trust it.")
            return (f"target={target!r}: its config.json cannot be read ({type(e).__name__}: {str(e)[:160]}); "
                    f"point it at a model saved with save_pretrained.")
        return None
    from transformers import AutoConfig

    offline_problem = (f"target={target!r}: a hub id that cannot be fetched here (no network to huggingface.co and "
                       f"not in the local Hugging Face cache). Download it where there is network "
                       f"(huggingface-cli download {target}) or pass a local model directory.")
    if not _in_hf_cache(target) and not _hub_reachable():
        return offline_problem  # at once, instead of the hub client's retries with backoff
    try:
        AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers wraps hub errors in OSError/ValueError with telling messages
        text = str(e)
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        if offline or any(s in text for s in ("couldn't connect", "offline mode", "Connection", "resolve")):
            return offline_problem
        if "trust_remote_code" in text:
            return (f"target={target!r}: its repository ships its own model code; pass trust_remote_code=True "
                    f"if you trust it.")
        return (f"target={target!r}: no such model on the Hugging Face hub ({type(e).__name__}: {text[:160]}); "
                f"check the id, or pass a local model directory.")
    return None


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (False at once under HF_HUB_OFFLINE=1)."""
    import os
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False
