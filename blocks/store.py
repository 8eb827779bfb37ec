"""The store block: where hotspare keeps everything, as configured in the Prefect UI.

Config only: :meth:`HotspareStore.open` hands the settings to :func:`hotspare.store.open_store`.
The secret key is a :class:`~pydantic.SecretStr`: shown masked in the UI, in ``repr`` and in
dumps, and revealed only inside :meth:`HotspareStore.open`.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from hotspare.store import Store, open_store


class HotspareStore(Block):
    """The object store of a hotspare installation: a directory or an S3 bucket prefix.

    Unset S3 settings fall back to the standard AWS environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``).
    """

    _block_type_name = "hotspare-store"
    _block_type_slug = "hotspare-store"
    _description = (
        "Where hotspare keeps extent logs, catalogs and consolidated VHDs: "
        "s3://bucket/prefix, file:///path or a directory."
    )
    _code_example = """\
    ```python
    from blocks.store import HotspareStore

    store = HotspareStore.load("BLOCK_NAME").open()  # a hotspare.store.Store
    ```
    """

    url: str = Field(
        default="./.hotspare/store",
        title="Store URL",
        description="s3://bucket/prefix for S3 (or SeaweedFS, MinIO), file:///abs/path or a "
        "directory path for a local store.",
        examples=["s3://dr-replicas/hotspare", "file:///var/lib/hotspare/store"],
    )
    endpoint_url: str | None = Field(
        default=None,
        title="S3 endpoint URL",
        description="For S3-compatible servers, e.g. http://seaweedfs:8333. Empty: AWS, or "
        "AWS_ENDPOINT_URL.",
    )
    region: str | None = Field(
        default=None,
        title="S3 region",
        description="e.g. eu-west-1. Empty: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1.",
    )
    access_key_id: str | None = Field(
        default=None,
        title="Access key ID",
        description="S3 access key. Empty: AWS_ACCESS_KEY_ID or the usual AWS credential chain.",
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        title="Secret access key",
        description="S3 secret key, stored encrypted and shown masked. Empty: "
        "AWS_SECRET_ACCESS_KEY or the usual AWS credential chain.",
    )

    def open(self) -> Store:
        """The configured store; the secret is revealed only for this call."""
        return open_store(
            self.url,
            endpoint_url=self.endpoint_url or None,
            region=self.region or None,
            access_key_id=self.access_key_id or None,
            secret_access_key=(
                self.secret_access_key.get_secret_value() if self.secret_access_key else None
            ),
        )
