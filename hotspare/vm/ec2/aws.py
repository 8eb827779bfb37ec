"""The boundary between hotspare's EC2 host and boto3: errors translated once, and polling.

Every EC2 or EBS call of :mod:`hotspare.vm.ec2.host`, :mod:`hotspare.vm.ec2.ebs` and
:mod:`hotspare.vm.ec2.capture` runs inside :func:`aws_call`, which turns what boto3 raises
into :class:`Ec2Error` (a :class:`~hotspare.errors.HotspareError`): the message names the
operation, the AWS resource (snapshot, image, instance, block) and AWS's error code, and the
original error is chained. Throttling and 5xx have already been retried by botocore
("standard" retry mode) when they get here; ``transient`` says whether a later retry of the
whole step may still help.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from botocore import exceptions as bex
from botocore.config import Config

from hotspare.errors import HotspareError

T = TypeVar("T")

# botocore's "standard" mode retries throttling (RequestLimitExceeded,
# ThrottlingException), 5xx and connection errors with capped exponential backoff.
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8})

_TRANSIENT_CODES = {
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottledException",
    "InternalError",
    "InternalServerException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
    "Unavailable",
}
# Codes meaning "no such resource": for deletes and look-ups that are allowed to find nothing.
NOT_FOUND_CODES = {
    "InvalidInstanceID.NotFound",
    "InvalidAMIID.NotFound",
    "InvalidAMIID.Unavailable",
    "InvalidSnapshot.NotFound",
    "InvalidVolume.NotFound",
    "ResourceNotFoundException",
}


class Ec2Error(HotspareError):
    """An EC2 or EBS call failed: ``op`` (the AWS operation), ``resource`` (what it was
    about), ``code`` (AWS's error code, or our own for checks such as a bad checksum)."""

    def __init__(self, op: str, resource: str, reason: str, *, code: str = "", transient: bool = False) -> None:
        self.op = op
        self.resource = resource
        self.code = code
        self.transient = transient
        super().__init__(f"{resource}: {op} failed: {reason}")

    @property
    def not_found(self) -> bool:
        return self.code in NOT_FOUND_CODES


@contextmanager
def aws_call(op: str, resource: str) -> Iterator[None]:
    """Run one AWS call, translating its failure into :class:`Ec2Error`."""
    try:
        yield
    except bex.ClientError as err:
        info = err.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        reason = f"{code or status}: {info.get('Message') or ''}".rstrip(": ")
        raise Ec2Error(op, resource, reason, code=code,
                       transient=code in _TRANSIENT_CODES or status == 429 or status >= 500) from err
    except NotImplementedError as err:
        # moto raises this in-process for the calls it lacks (ImportSnapshot, ImportImage,
        # GetConsoleScreenshot); a real endpoint never does.
        raise Ec2Error(op, resource, f"{op} is not implemented by this EC2 endpoint ({err}); "
                                     "moto lacks it, real AWS has it", code="NotImplemented") from err
    except (bex.NoCredentialsError, bex.PartialCredentialsError) as err:
        raise Ec2Error(op, resource, f"{err} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                                     "or the host config's keys)", code="NoCredentials") from err
    except (bex.ConnectionError, bex.HTTPClientError, bex.IncompleteReadError, bex.ResponseStreamingError) as err:
        raise Ec2Error(op, resource, str(err), code="Connection", transient=True) from err
    except bex.ParamValidationError as err:
        raise Ec2Error(op, resource, f"invalid request: {err}", code="ParamValidation") from err


def poll(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float) -> T:
    """Call ``probe`` every ``interval`` seconds until it returns something other than None
    (its own errors propagate); raise HotspareError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise HotspareError(f"{what}: still not done after {timeout:.0f} s")
        time.sleep(interval)
