"""The EC2 host's configuration: where and how stand-in VMs run on EC2.

Configuration only (as prefect-aws blocks hold it), so that a Prefect block can carry it
later; :meth:`Ec2HostConfig.session` hands out a boto3 session, the only place the secrets
are revealed. Unset credentials come from the standard AWS chain (environment variables,
profile, instance role).
"""

from __future__ import annotations

from typing import Literal

import boto3
from pydantic import BaseModel, Field, SecretStr


class Ec2HostConfig(BaseModel):
    """Where and how hotspare runs stand-in VMs on EC2. Configuration only, so that a
    Prefect block can carry it; credentials default to the standard AWS chain
    (environment, profile, instance role), and given keys are secrets, never shown."""

    region: str = Field(title="Region", description="e.g. eu-west-1")
    instance_type: str = Field("t3.micro", title="Instance type",
                               description="Nitro types see the root disk as NVMe and need ENA")
    subnet_id: str | None = Field(None, title="Subnet", description="empty: the default VPC's")
    security_group_ids: list[str] = Field(default_factory=list, title="Security groups")
    disk_source: Literal["ebs-direct", "import-snapshot"] = Field(
        "ebs-direct", title="Boot disk upload",
        description="ebs-direct: EBS direct APIs, a point's snapshot from its chunks (over the last one's); "
                    "import-snapshot: VM Import from S3 of the point exported as a local image")
    import_bucket: str | None = Field(None, title="Import bucket", description="S3 bucket for import-snapshot")
    import_prefix: str = Field("hotspare-imports/", title="Import key prefix")
    import_role_name: str | None = Field(None, title="VM Import role", description="empty: vmimport")
    volume_type: str = Field("gp3", title="Root volume type")
    boot_mode: Literal["legacy-bios", "uefi"] = Field("legacy-bios", title="Boot mode")
    ena_support: bool = Field(True, title="ENA support", description="required by Nitro instance types")
    tags: dict[str, str] = Field(default_factory=dict, title="Extra tags", description="on every resource")
    endpoint_url: str | None = Field(None, title="EC2/EBS endpoint", description="empty: AWS")
    profile_name: str | None = Field(None, title="AWS profile")
    access_key_id: str | None = Field(None, title="Access key ID")
    secret_access_key: SecretStr | None = Field(None, title="Secret access key")
    session_token: SecretStr | None = Field(None, title="Session token")
    upload_workers: int = Field(8, ge=1, le=64, title="Parallel block uploads and reads")
    snapshot_timeout: float = Field(3600.0, gt=0, description="seconds for a snapshot to complete")
    import_timeout: float = Field(7200.0, gt=0, description="seconds for ImportSnapshot")
    boot_timeout: float = Field(600.0, gt=0, description="seconds for the instance to reach running")
    poll_interval: float = Field(5.0, gt=0, description="seconds between state checks")

    def session(self) -> boto3.Session:
        """A boto3 session; the secrets are revealed only for this call."""
        return boto3.Session(
            region_name=self.region, profile_name=self.profile_name,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            aws_session_token=self.session_token.get_secret_value() if self.session_token else None)
