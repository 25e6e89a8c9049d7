"""Object storage: ingest -> train -> predict against ``s3://`` on a local S3 server (moto).

The server is a real HTTP server on 127.0.0.1; endpoint and credentials reach s3fs through
the usual AWS environment variables, or through ``--storage_options``.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import rasterio

from .conftest import one_error_line

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch):
    """An empty bucket on a local S3 server; yields the endpoint URL. Any connection to
    another address than 127.0.0.1 fails the test."""
    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "localhost"):
            pytest.fail(f"connection attempted to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    import fsspec
    import s3fs

    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bucket")
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_ingest_train_predict_on_s3(s3, series_dir, tmp_path, run_cli):
    import s3fs

    store = "s3://bucket/qs.zarr"
    result = run_cli("ingest", series_dir, store)
    assert result.status == 0, result.err
    assert "wrote 40 daily map(s)" in result.out
    assert run_cli("ingest", series_dir, store).out.count("40 already present") == 1  # idempotent remotely too
    info = run_cli("info", store)
    assert info.status == 0 and "time=40" in info.out and "MB (" in info.out  # size counted in the bucket

    result = run_cli("train", "--data_dir", store, "--epochs", "1", "--batch_size", "4", "--hidden_channels", "4",
                     "--patch", "16", "--device", "cpu", "--checkpoint_dir", "s3://bucket/checkpoints",
                     "--output_dir", "s3://bucket/outputs")
    assert result.status == 0, result.err
    fs = s3fs.S3FileSystem()
    assert fs.exists("bucket/checkpoints/best.pth") and fs.exists("bucket/outputs/history.csv")
    assert fs.exists("bucket/outputs/plots/loss_curves.png")

    # the endpoint given as --storage_options instead of the environment
    options = json.dumps({"endpoint_url": s3, "key": "testing", "secret": "testing"})
    result = run_cli("predict", "--weights_path", "s3://bucket/checkpoints/best.pth", "--input_dir", store,
                     "--output_dir", "s3://bucket/predictions", "--plots_dir", "s3://bucket/plots", "--last",
                     "--storage_options", options)
    assert result.status == 0, result.err
    (name,) = [p.rsplit("/", 1)[1] for p in fs.ls("bucket/predictions")]
    assert name.startswith("QS_") and name.endswith("_lead1.tif")
    assert fs.ls("bucket/plots")
    local = tmp_path / name
    fs.get(f"bucket/predictions/{name}", str(local))
    with rasterio.open(local) as forecast, rasterio.open(sorted(series_dir.glob("*.tif"))[0]) as source:
        assert forecast.crs == source.crs and forecast.transform == source.transform
        assert np.isfinite(forecast.read(1, masked=True).compressed()).all()


def test_an_endpoint_that_does_not_answer_is_one_line(series_dir, monkeypatch, run_cli):
    import s3fs

    # a closed port on this machine: the connection is refused at once, nothing leaves it
    options = json.dumps({"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
                          "config_kwargs": {"retries": {"max_attempts": 1}}})
    s3fs.S3FileSystem.clear_instance_cache()
    result = run_cli("ingest", series_dir, "s3://bucket/qs.zarr", "--storage_options", options)
    assert result.status == 2
    assert "the object store failed (EndpointConnectionError" in one_error_line(result.err)
    result = run_cli("info", "s3://bucket/qs.zarr", "--storage_options", options)
    assert result.status == 2 and "no Zarr cube could be opened there" in one_error_line(result.err)


def test_a_file_url_is_a_local_path(series_dir, tmp_path, run_cli):
    result = run_cli("ingest", series_dir, f"file://{tmp_path / 'qs.zarr'}")
    assert result.status == 0, result.err
    assert "time=40" in run_cli("info", f"file://{tmp_path / 'qs.zarr'}").out
