"""Encoder commands: ``export-encoder``, ``serve-encoder`` and ``embed``.

TensorFlow is imported inside the commands, so ``simstream --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from streams.cli.group import main
from streams.settings import get_settings


@main.command("export-encoder")
@click.option("--out", "model_base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model base; the SavedModel goes to OUT/<version>/ [SIMSTREAM_MODEL_BASE].")
@click.option("--version", "version", type=click.IntRange(1), default=None,
              help="Version folder to write [default: one past the latest].")
@click.option("--config-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("infra/tfserving"),
              show_default=True, help="Where models.config and batching_parameters.txt are written.")
@click.option("--serving-base-path", default=None,
              help="base_path in models.config: the model base as TF Serving sees it [/models/<model name>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing version folder.")
@click.option("--if-missing", is_flag=True, help="Do nothing when OUT already holds a version (for make).")
def export_encoder(model_base: Path | None, version: int | None, config_dir: Path, serving_base_path: str | None,
                   overwrite: bool, if_missing: bool) -> None:
    """Export all-MiniLM-L6-v2 (Keras port) as a TF Serving SavedModel, plus TF Serving configs."""
    from encoders.export import export_encoder as run_export
    from encoders.export import list_versions

    settings = get_settings()
    base = (model_base or settings.model_base).expanduser()
    if if_missing and list_versions(base):
        click.echo(f"{base} already holds version(s) {list_versions(base)}; nothing to do")
        return
    result = run_export(base, version=version, config_dir=config_dir, model_name=settings.model_name,
                        serving_base_path=serving_base_path, max_length=settings.max_length, overwrite=overwrite)
    click.echo(f"SavedModel version {result.version} -> {result.version_dir}")
    click.echo(f"TF Serving configs -> {result.models_config}, {result.batching_config}")


@main.command("serve-encoder")
@click.option("--model-base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model base with <version>/ folders [SIMSTREAM_MODEL_BASE].")
@click.option("--port", type=click.IntRange(1, 65535), default=8500, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--model-name", default=None, help="Name clients ask for [SIMSTREAM_MODEL_NAME].")
@click.option("--version", "version", type=click.IntRange(1), default=None,
              help="Serve this version [SIMSTREAM_MODEL_VERSION, default: the latest].")
def serve_encoder(model_base: Path | None, port: int, host: str, model_name: str | None, version: int | None) -> None:
    """Serve the SavedModel over TF Serving's gRPC PredictionService (development and tests).

    Production runs TF Serving itself (tensorflow/serving:*-gpu) with infra/tfserving/models.config;
    this server speaks the same protocol, so SIMSTREAM_ENCODER=grpc://HOST:PORT works with both.
    """
    import asyncio
    import logging

    from encoders.server import serve

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        asyncio.run(serve((model_base or settings.model_base).expanduser(), host=host, port=port,
                          model_name=model_name or settings.model_name,
                          model_version=version if version is not None else settings.model_version))


@main.command("embed")
@click.option("--in", "catalog", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Catalog as product-changes JSONL (upserts).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Writes ids.txt and vectors.npy here.")
@click.option("--encoder", "encoder_target", default=None, help="local, grpc://host:port or hashing [SIMSTREAM_ENCODER].")
@click.option("--model-base", type=click.Path(path_type=Path), default=None, help="[SIMSTREAM_MODEL_BASE]")
@click.option("--description-chars", type=click.IntRange(0), default=None,
              help="Description characters in the product text [serving.text default].")
def embed(catalog: Path, out_dir: Path, encoder_target: str | None, model_base: Path | None,
          description_chars: int | None) -> None:
    """Embed a catalog offline: ids.txt (one id a line) and vectors.npy (float32, unit rows)."""
    import numpy as np
    from tqdm import tqdm

    from encoders.factory import create_encoder
    from serving.text import DEFAULT_DESCRIPTION_CHARS, product_text
    from streams.cli.eval_commands import load_products

    settings = get_settings()
    products = load_products(catalog)
    latest = {p.product_id: p for p in products}  # a later upsert of the same id wins
    products = list(latest.values())
    chars = DEFAULT_DESCRIPTION_CHARS if description_chars is None else description_chars
    texts = [product_text(p, description_chars=chars) for p in products]
    encoder = create_encoder(encoder_target or settings.encoder, model_base=model_base or settings.model_base,
                             model_name=settings.model_name, model_version=settings.model_version,
                             max_length=settings.max_length, timeout_s=settings.encoder_timeout_s,
                             retries=settings.encoder_retries)
    vectors = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    chunk = 256
    version = ""
    with tqdm(total=len(texts), desc="embed", unit=" products", file=sys.stderr) as bar:
        for start in range(0, len(texts), chunk):
            result = encoder.encode_blocking(texts[start : start + chunk])
            vectors[start : start + len(result)] = result.vectors
            version = result.model_version
            bar.update(len(result))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ids.txt").write_text("".join(p.product_id + "\n" for p in products), encoding="utf-8")
    np.save(out_dir / "vectors.npy", vectors)
    click.echo(f"{len(products)} vectors ({version}) -> {out_dir / 'vectors.npy'}, ids -> {out_dir / 'ids.txt'}")
