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

    region: str = Field(title="Region", description='AWS region the VMs run in, e.g. eu-west-1.')
    instance_type: str = Field("t3.micro", title="Instance type", description='EC2 instance type; Nitro types see the disks as NVMe and need ENA.')
    subnet_id: str | None = Field(None, title="Subnet", description="Subnet of the instances; empty: the default VPC's.")
    security_group_ids: list[str] = Field(default_factory=list, title="Security groups", description="Security groups of the instances; empty: the VPC's default group.")
    disk_source: Literal["ebs-direct", "import-snapshot"] = Field(
        "ebs-direct", title="Boot disk upload", description="ebs-direct: a point's snapshot made from its chunks with the EBS direct APIs (over the last one's); import-snapshot: VM Import from S3 of the point exported as a local image.")
    import_bucket: str | None = Field(None, title="Import bucket", description='S3 bucket that import-snapshot uploads images to.')
    import_prefix: str = Field("hotspare-imports/", title="Import key prefix", description='Key prefix of the uploaded images in the import bucket.')
    import_role_name: str | None = Field(None, title="VM Import role", description='IAM role VM Import assumes; empty: vmimport.')
    volume_type: str = Field("gp3", title="Root volume type", description="EBS volume type of the VM's disks.")
    boot_mode: Literal["legacy-bios", "uefi"] = Field("legacy-bios", title="Boot mode", description='Firmware the registered image boots with.')
    ena_support: bool = Field(True, title="ENA support", description='Register the image with ENA networking (required by Nitro instance types).')
    tags: dict[str, str] = Field(default_factory=dict, title="Extra tags", description='Extra tags put on every resource the host creates.')
    endpoint_url: str | None = Field(None, title="EC2/EBS endpoint", description='EC2 and EBS endpoint; empty: AWS.')
    profile_name: str | None = Field(None, title="AWS profile", description='AWS profile of the credentials; empty: the standard chain.')
    access_key_id: str | None = Field(None, title="Access key ID", description='AWS access key; empty: the standard credential chain.')
    secret_access_key: SecretStr | None = Field(None, title="Secret access key", description='AWS secret key, stored encrypted and shown masked; empty: the standard chain.')
    session_token: SecretStr | None = Field(None, title="Session token", description='AWS session token of temporary credentials, stored encrypted.')
    upload_workers: int = Field(8, ge=1, le=64, title="Parallel block uploads and reads", description='EBS block uploads and reads in flight.')
    snapshot_timeout: float = Field(3600.0, gt=0, description='Seconds for a snapshot to complete.')
    import_timeout: float = Field(7200.0, gt=0, description='Seconds for ImportSnapshot to complete.')
    boot_timeout: float = Field(600.0, gt=0, description='Seconds for the instance to reach running.')
    poll_interval: float = Field(5.0, gt=0, description='Seconds between state checks.')

    def session(self) -> boto3.Session:
        """A boto3 session; the secrets are revealed only for this call."""
        return boto3.Session(
            region_name=self.region, profile_name=self.profile_name,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            aws_session_token=self.session_token.get_secret_value() if self.session_token else None)
