"""S3 set-up mistakes a newcomer makes -- no credentials, a wrong secret, a bucket that does
not exist -- against the real server: one line naming the URL and the cause, at the first
request (counted by a proxy in front of the server), and ``ckpt``'s usage/environment exit
code, not the "damaged checkpoint" one."""

from __future__ import annotations

import uuid

import pytest
import torch

import ckptstore as cs
from ckptstore.cli.main import EXIT_USAGE, main
from ckptstore.errors import StoreAccessError
from ckptstore.testing.faultproxy import FaultProxy
from ckptstore.testing.seaweed import S3_PORT


def _checkpoint(seaweed) -> str:
    url = f"s3://access-{uuid.uuid4().hex[:10]}/run/step_00000001"
    cs.save({"w": torch.ones(4)}, url, storage_options={**seaweed.options(), "create_bucket": True})
    return url


def test_a_wrong_secret_fails_at_once_naming_the_cause(seaweed) -> None:
    url = _checkpoint(seaweed)
    with FaultProxy(("127.0.0.1", S3_PORT)) as proxy:
        wrong = {**seaweed.options(proxy.endpoint), "aws_secret_access_key": "not-the-secret"}
        with pytest.raises(StoreAccessError) as info:
            cs.load({"w": torch.zeros(4)}, url, storage_options=wrong)
    message = str(info.value)
    assert message.startswith(url) and "secret access key is wrong" in message, message
    assert "\n" not in message
    # Refused requests are not retried: one HEAD of the manifest (and one listing that asks
    # the server why the HEAD, which has no body, was refused).
    assert [r.method for r in proxy.requests] == ["HEAD", "GET"]


def test_a_missing_bucket_is_named(seaweed) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    with (
        FaultProxy(("127.0.0.1", S3_PORT)) as proxy,
        pytest.raises(StoreAccessError, match="the bucket does not exist"),
    ):
        cs.CheckpointManager(url, storage_options=seaweed.options(proxy.endpoint)).steps()
    assert len(proxy.requests) == 1


def test_missing_credentials_are_named_without_a_request(seaweed, monkeypatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no lookup beyond this machine
    url = _checkpoint(seaweed)
    with (
        FaultProxy(("127.0.0.1", S3_PORT)) as proxy,
        pytest.raises(StoreAccessError, match="no AWS credentials found"),
    ):
        cs.open(url, storage_options={"endpoint_url": proxy.endpoint})
    assert proxy.requests == []


def test_ckpt_says_it_in_one_line_with_the_usage_exit_code(seaweed, monkeypatch, capsys) -> None:
    url = _checkpoint(seaweed)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.options()["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for argv in (["ls", url.rsplit("/", 1)[0]], ["inspect", url], ["verify", url]):
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "secret access key is wrong" in err, err
