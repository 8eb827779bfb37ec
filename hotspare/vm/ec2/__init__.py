"""The EC2 host: a stand-in VM as an EC2 instance on EBS volumes, and the capture of its writes.

Terms:
- EC2 host: :class:`~hotspare.vm.ec2.host.Ec2Host`, a :class:`~hotspare.vm.host.VmHost` whose
  VM is one instance booted from an image registered on one EBS snapshot per disk; its
  configuration, region and credentials (secrets) included, is
  :class:`~hotspare.vm.ec2.config.Ec2HostConfig`.
- launch resources: the disk snapshots, image, instance and kept volumes of one launch, each
  tagged with the VM id so that a crashed launch or stop is found again by its tag
  (:mod:`hotspare.vm.ec2.resources`).
- EBS direct APIs: snapshots put, listed and read block by block, 512 KiB blocks with
  SHA-256 checksums (:mod:`hotspare.vm.ec2.ebs`).
- point snapshot: a recovery point's EBS snapshot, made straight from its chunks over the
  snapshot of an older point (:mod:`hotspare.vm.ec2.ebs_chunks`) and recorded in the store
  for the next (:mod:`hotspare.vm.ec2.ebs_points`); it outlives the VMs booted from it.
- delta capture: a disk's writes shipped as extent logs from successive snapshots of its
  volume (:class:`~hotspare.vm.ec2.capture.Ec2DeltaCapture`), with where it stands per disk
  kept in a cursor (:mod:`hotspare.vm.ec2.capture_state`).
- AWS boundary: every boto3 call wrapped once, its errors translated into
  :class:`~hotspare.vm.ec2.aws.Ec2Error` naming the operation and resource
  (:mod:`hotspare.vm.ec2.aws`).

Every module here but ``capture_state`` needs boto3 (or botocore); this package imports
nothing itself, and ``import hotspare.vm`` imports none of it.
"""
