"""An S3-compatible server on 127.0.0.1 for tests: moto's standalone server on a free port, one bucket.

    from tests.s3_server import s3_server      # a pytest fixture (module scope): S3Server
    def test_x(s3_server):
        s3_server.put("inputs/docs.jsonl", data)
        TableConfig(uri=s3_server.uri("db"), storage_options=s3_server.storage_options)

`storage_options` are the object-store keys LanceDB takes (endpoint, region, keys, allow_http); the backfill's
sources take the same (`SourceConfig.storage_options`). Loopback only; the server stops with the module.
"""

from __future__ import annotations

import logging
import socket
import uuid
from dataclasses import dataclass

import pytest

REGION = "us-east-1"
KEY_ID, SECRET = "test-key", "test-secret"


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, str]:
        return {
            "aws_access_key_id": KEY_ID,
            "aws_secret_access_key": SECRET,
            "aws_endpoint": self.endpoint,
            "aws_region": REGION,
            "allow_http": "true",
        }

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def put(self, key: str, data: bytes) -> str:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.uri(key)

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket=f"vlm-embed-{uuid.uuid4().hex[:8]}")
    s3.client().create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        server.stop()
