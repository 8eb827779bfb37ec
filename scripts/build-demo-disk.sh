#!/usr/bin/env bash
# Builds hotspare's demo "physical machine": a raw disk image that boots in QEMU (SeaBIOS)
# from its own boot loader, with no -kernel on the QEMU command line.
#
#   scripts/build-demo-disk.sh OUT.img [SIZE_MIB]      (SIZE_MIB defaults to 64)
#
# Layout (DOS label, made with sfdisk on the image file; no loop device, no mount):
#   bytes 0..439     syslinux mbr.bin
#   partition 1      FAT16, bootable, from 1 MiB: vmlinuz, initrd.img, syslinux.cfg, ldlinux.*
#                    (made apart with mkfs.vfat -C, filled with mcopy, syslinux --install,
#                    then copied in with dd conv=notrunc)
#   partition 2      the data partition, MBR type 0xda ("non-FS data"), raw, up to the end.
#
# The guest (a busybox-static initramfs under Debian's cloud kernel) finds partition 2 and,
# once a second, bumps a counter it keeps in the partition's first sector
# ("HOTSPARE-MARKER counter=<n> boot=<boot id> ...", NUL padded), writes a rotating record at
# sector 1 + n % 64, syncs, and prints "hotspare-marker counter=<n> boot=<id>" on ttyS0 and
# on the screen (tty0, the VGA console).
# It writes nowhere else. A copy of the disk booted elsewhere continues the count.
#
# Build tools come from Debian (installed with apt-get when missing); the kernel is the
# current linux-image-*-cloud-amd64 package (override: HOTSPARE_DEMO_KERNEL_PKG=<package>).
# The .deb, the kernel and the initramfs are cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/hotspare/demo-disk/<package>_<version>/, so a second build
# takes about a second. Works offline from that cache.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
export LC_ALL=C

die() { echo "build-demo-disk: error: $*" >&2; exit 1; }
log() { echo "build-demo-disk: $*" >&2; }

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUT.img [SIZE_MIB]" >&2; exit 2; }
out=$1
size_mib=${2:-64}
case "$size_mib" in ''|*[!0-9]*) die "SIZE_MIB must be a whole number of MiB, got '$size_mib'" ;; esac

# Disk identifier written in the MBR (bytes 440..443, little endian): the guest checks it
# before it writes, so it never writes to some other disk that happens to have a partition 2.
LABEL_ID=0x48535044            # bytes "DPSH" on disk; the guest reads 44505348
LABEL_ID_ON_DISK=44505348
DATA_TYPE=da
P1_START=2048                  # sectors: partition 1 starts at 1 MiB
SLOTS=64                       # rotating records at sectors 1..64 of partition 2
MODULE_TARGETS="virtio_pci virtio_blk virtio_scsi ata_piix sd_mod"

# ---------------------------------------------------------------- build tools
sudo_=""
[ "$(id -u)" -eq 0 ] || sudo_=sudo
missing=()
command -v syslinux >/dev/null 2>&1 || missing+=(syslinux)
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=(syslinux-common)
command -v mcopy >/dev/null 2>&1 || missing+=(mtools)
command -v mkfs.vfat >/dev/null 2>&1 || missing+=(dosfstools)
command -v sfdisk >/dev/null 2>&1 || missing+=(fdisk)
[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)" = "install ok installed" ] \
  || missing+=(busybox-static)
command -v cpio >/dev/null 2>&1 || missing+=(cpio)
{ command -v depmod && command -v modprobe; } >/dev/null 2>&1 || missing+=(kmod)
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    $sudo_ apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
  }
  if ! apt_install 2>/dev/null; then
    $sudo_ apt-get update -qq -o DPkg::Lock::Timeout=300 || die "apt-get update failed"
    apt_install || die "could not install ${missing[*]} with apt-get"
  fi
fi
busybox_bin=/bin/busybox
[ -x "$busybox_bin" ] || die "$busybox_bin missing after installing busybox-static"
mbr_bin=/usr/lib/syslinux/mbr/mbr.bin

# ---------------------------------------------------------------- cache and kernel
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/hotspare/demo-disk
mkdir -p "$cache_root"

resolve_kernel() {
  # "<package> <version>": the cloud kernel the meta package linux-image-cloud-amd64 currently
  # points at (its candidate's "Depends: linux-image-<abi>-cloud-amd64 (= <version>)"), or the
  # candidate of $HOTSPARE_DEMO_KERNEL_PKG. One apt-cache call: apt here keeps no pkgcache.bin,
  # so each call costs most of a second.
  if [ -n "${HOTSPARE_DEMO_KERNEL_PKG:-}" ]; then
    apt-cache show --no-all-versions "$HOTSPARE_DEMO_KERNEL_PKG" 2>/dev/null \
      | sed -n "s/^Version: \(.*\)$/$HOTSPARE_DEMO_KERNEL_PKG \1/p" | head -n1
  else
    apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null \
      | sed -n 's/^Depends: .*\(linux-image-[^ ,]*-cloud-amd64\) (= \([^)]*\)).*$/\1 \2/p' | head -n1
  fi
}
read -r pkg ver <<<"$(resolve_kernel)" || true
if [ -z "$pkg" ] || [ -z "$ver" ]; then
  log "apt-cache knows no cloud kernel; running apt-get update"
  if $sudo_ apt-get update -qq -o DPkg::Lock::Timeout=300; then
    read -r pkg ver <<<"$(resolve_kernel)" || true
  fi
fi
if [ -z "$pkg" ] || [ -z "$ver" ]; then
  # Offline: use the newest kernel already in the cache.
  newest=$(ls -1t "$cache_root/${HOTSPARE_DEMO_KERNEL_PKG:-linux-image-}"*/kernel-version 2>/dev/null | head -n1 || true)
  [ -n "$newest" ] || die "cannot resolve linux-image-*-cloud-amd64 with apt-cache, and the cache $cache_root is empty"
  key=$(basename "$(dirname "$newest")")
  log "apt unavailable; using cached kernel $key"
else
  key="${pkg}_${ver}"
fi
kdir=$cache_root/$key
mkdir -p "$kdir"

# One builder at a time fills a cache entry; results land by rename, so readers never see
# half-written files.
exec 9>"$kdir/.lock"
flock 9

work=$(mktemp -d "${TMPDIR:-/tmp}/hotspare-demo-disk.XXXXXX")
stage=$(mktemp -d "$kdir/.stage.XXXXXX")   # same file system as the cache: renames are atomic
tmp_out=""
trap 'rm -rf "$work" "$stage"; [ -z "$tmp_out" ] || rm -f "$tmp_out"' EXIT

if [ ! -f "$kdir/kernel-version" ] || [ ! -f "$kdir/vmlinuz" ] || [ ! -f "$kdir/modules/order" ]; then
  deb=$(ls -1 "$kdir"/*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    log "apt-get download $pkg=$ver"
    mkdir -p "$work/dl"
    chmod 0777 "$work/dl"   # apt downloads as the _apt user when it can
    (cd "$work/dl" && apt-get download -qq "$pkg=$ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb=$(ls -1 "$work/dl"/*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "apt-get download $pkg=$ver produced no .deb"
    mv "$deb" "$stage/"
    mv "$stage/$(basename "$deb")" "$kdir/"
    deb=$kdir/$(basename "$deb")
  fi
  log "unpacking $(basename "$deb")"
  root=$work/root
  dpkg -x "$deb" "$root" || { rm -f "$deb"; die "$(basename "$deb") does not unpack; removed it from the cache, run again"; }
  vmlinuz=$(ls -1 "$root"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
  [ -n "$vmlinuz" ] || die "$(basename "$deb") holds no /boot/vmlinuz-*"
  kver=${vmlinuz##*/vmlinuz-}
  [ -d "$root/lib/modules/$kver" ] || die "$(basename "$deb") holds no /lib/modules/$kver"
  depmod -b "$root" "$kver"
  # Modules in dependency order: each target's dependencies first, each module once.
  mkdir -p "$work/modules"
  : >"$work/modules/order"
  for target in $MODULE_TARGETS; do
    deps=$(modprobe -d "$root" -S "$kver" --show-depends "$target" 2>/dev/null) \
      || die "modprobe --show-depends $target failed for kernel $kver"
    while read -r kind path _; do
      [ "$kind" = insmod ] || continue
      name=$(basename "$path")
      case "$name" in
        *.ko) ;;
        *.ko.xz) xz -dc "$path" >"$work/modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$path" >"$work/modules/${name%.zst}"; name=${name%.zst} ;;
        *.ko.gz) gzip -dc "$path" >"$work/modules/${name%.gz}"; name=${name%.gz} ;;
        *) die "unexpected module file $path" ;;
      esac
      [ -f "$work/modules/$name" ] || cp "$path" "$work/modules/$name"
      grep -qx "$name" "$work/modules/order" || echo "$name" >>"$work/modules/order"
    done <<<"$deps"
  done
  cp -p "$vmlinuz" "$stage/vmlinuz"
  echo "$kver" >"$stage/kernel-version"
  cp -r "$work/modules" "$stage/modules"
  rm -rf "$kdir/modules"
  mv "$stage/modules" "$kdir/modules"
  mv "$stage/vmlinuz" "$kdir/vmlinuz"
  mv "$stage/kernel-version" "$kdir/kernel-version"   # last: it marks the entry complete
  rm -rf "$root"
fi
kver=$(cat "$kdir/kernel-version")

# ---------------------------------------------------------------- guest init
cat >"$work/init" <<'EOF_INIT'
#!/bin/sh
# hotspare demo guest: bump a counter in the data partition (partition 2) once a second.
export PATH=/bin
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "hotspare-guest: booted kernel $(uname -r)"
echo "hotspare-guest: booted kernel $(uname -r)" >/dev/tty0 2>/dev/null

for m in $(cat /etc/hotspare/modules); do
  insmod "/lib/modules/$m" 2>/tmp/insmod.err || {
    grep -q 'File exists' /tmp/insmod.err || echo "hotspare-guest: insmod $m: $(cat /tmp/insmod.err)"
  }
done

label_id=@LABEL_ID_ON_DISK@
slots=@SLOTS@

hexbytes() { # DEVICE OFFSET COUNT -> lowercase hex, no spaces
  dd if="$1" bs=512 count=1 2>/dev/null | od -An -v -tx1 -j "$2" -N "$3" | tr -d ' \n'
}

# The data partition: partition 2 of a disk whose MBR carries our disk identifier and whose
# partition 2 has type 0xda. Never anything else.
find_data() {
  for d in vda sda hda xvda nvme0n1 vdb sdb; do
    [ -b "/dev/$d" ] || continue
    case "$d" in nvme*) p=${d}p2 ;; *) p=${d}2 ;; esac
    [ -b "/dev/$p" ] || continue
    [ "$(hexbytes "/dev/$d" 440 4)" = "$label_id" ] || continue
    [ "$(hexbytes "/dev/$d" 466 1)" = "@DATA_TYPE@" ] || continue
    size=$(cat "/sys/class/block/$p/size" 2>/dev/null || echo 0)
    [ "$size" -gt "$slots" ] || continue
    echo "$p"
    return 0
  done
  return 1
}

tries=0
until data=$(find_data); do
  tries=$((tries + 1))
  if [ "$tries" -eq 300 ]; then
    echo "hotspare-guest: error: no data partition found (disks: $(ls /sys/block | tr '\n' ' '))"
  fi
  sleep 0.1
done
dev=/dev/$data
echo "hotspare-guest: data partition $dev ($(cat /sys/class/block/$data/size) sectors)"

boot=$(cat /proc/sys/kernel/random/boot_id)
kver=$(uname -r)
prev=$(dd if="$dev" bs=512 count=1 2>/dev/null | tr '\000' '\n' | head -n 1)
n=0
case "$prev" in
  "HOTSPARE-MARKER counter="*) n=${prev#HOTSPARE-MARKER counter=}; n=${n%% *} ;;
esac
case "$n" in ''|*[!0-9]*) n=0 ;; esac
echo "hotspare-guest: previous counter $n"

# record SECTOR TEXT: one 512-byte sector of the data partition, TEXT then NULs.
record() {
  printf '%s\n' "$2" | dd of="$dev" bs=512 seek="$1" count=1 iflag=fullblock conv=sync,notrunc,fsync 2>/tmp/dd.err \
    || { echo "hotspare-guest: error: write sector $1 of $dev: $(cat /tmp/dd.err)"; return 1; }
}

while :; do
  n=$((n + 1))
  up=$(cut -d ' ' -f 1 /proc/uptime)
  slot=$((1 + n % slots))
  ok=1
  record 0 "HOTSPARE-MARKER counter=$n boot=$boot uptime=$up slot=$slot kernel=$kver" || ok=0
  record "$slot" "HOTSPARE-BLOCK counter=$n boot=$boot slot=$slot" || ok=0
  sync
  if [ "$ok" = 1 ]; then
    echo "hotspare-marker counter=$n boot=$boot"
    # The screen too (the VGA console), so the failover's screenshot proves the boot.
    echo "hotspare-marker counter=$n boot=$boot" >/dev/tty0 2>/dev/null
  fi
  sleep 1
done
EOF_INIT
sed -i -e "s/@LABEL_ID_ON_DISK@/$LABEL_ID_ON_DISK/" -e "s/@SLOTS@/$SLOTS/" -e "s/@DATA_TYPE@/$DATA_TYPE/" "$work/init"

# Same kernel, same script: same bytes. Timestamps in the initramfs and the FAT are the
# kernel's build time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$kdir/vmlinuz")}

# ---------------------------------------------------------------- initramfs (cached)
bb_ver=$(dpkg-query -W -f='${Version}' busybox-static)
ihash=$( { cat "$work/init"; echo "$bb_ver"; cat "$kdir/modules/order"; } | sha256sum | cut -c1-16)
initrd=$kdir/initrd-$ihash.img
if [ ! -f "$initrd" ]; then
  log "building initramfs ($(tr '\n' ' ' <"$kdir/modules/order"| sed 's/\.ko//g'))"
  ir=$work/initramfs
  mkdir -p "$ir/bin" "$ir/dev" "$ir/proc" "$ir/sys" "$ir/tmp" "$ir/etc/hotspare" "$ir/lib/modules"
  cp "$busybox_bin" "$ir/bin/busybox"
  ln -s busybox "$ir/bin/sh"
  cp "$work/init" "$ir/init"
  chmod 0755 "$ir/init"
  cp "$kdir"/modules/*.ko "$ir/lib/modules/"
  cp "$kdir/modules/order" "$ir/etc/hotspare/modules"
  find "$ir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  (cd "$ir" && find . -mindepth 1 | sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    | gzip -n -9 >"$stage/initrd.img"
  mv "$stage/initrd.img" "$initrd"
  # Keep only the current initramfs of this kernel.
  find "$kdir" -maxdepth 1 -name 'initrd-*.img' ! -name "initrd-$ihash.img" -delete
fi
flock -u 9

# ---------------------------------------------------------------- partition 1 (FAT16)
cat >"$work/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT hotspare
PROMPT 0
TIMEOUT 0
LABEL hotspare
  KERNEL /vmlinuz
  APPEND console=ttyS0,115200 initrd=/initrd.img quiet
EOF
payload=$(( $(stat -c %s "$kdir/vmlinuz") + $(stat -c %s "$initrd") + 1024 * 1024 ))
mib=$((1024 * 1024))
p1_mib=$(( (payload + mib - 1) / mib + 1 ))     # ldlinux, FAT tables, root dir, slack
p1_sectors=$((p1_mib * 2048))
min_mib=$((1 + p1_mib + 1))                     # 1 MiB gap, partition 1, 1 MiB of data
[ "$size_mib" -ge "$min_mib" ] || die "SIZE_MIB $size_mib is too small: this kernel and initramfs need at least $min_mib MiB"

part1=$work/part1.img
mkfs.vfat --invariant -C -F 16 -n HOTSPARE -i 48535031 -h "$P1_START" "$part1" $((p1_mib * 1024)) >/dev/null
mcopy -i "$part1" "$kdir/vmlinuz" ::/vmlinuz
mcopy -i "$part1" "$initrd" ::/initrd.img
mcopy -i "$part1" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$part1"

# ---------------------------------------------------------------- the disk
img=$work/disk.img
truncate -s "$((size_mib * mib))" "$img"
sfdisk -q --no-reread --no-tell-kernel "$img" >/dev/null <<EOF
label: dos
label-id: $LABEL_ID
unit: sectors

start=$P1_START, size=$p1_sectors, type=6, bootable
start=$((P1_START + p1_sectors)), type=$DATA_TYPE
EOF
dd if="$part1" of="$img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$mbr_bin" of="$img" bs=440 count=1 conv=notrunc status=none

# Into place: next to OUT, then a rename, so OUT is never half written.
out_dir=$(dirname -- "$out")
mkdir -p "$out_dir"
tmp_out=$(mktemp "$out_dir/.$(basename -- "$out").XXXXXX")
cp --sparse=always "$img" "$tmp_out"
chmod 0644 "$tmp_out"
mv -f "$tmp_out" "$out"
tmp_out=""
log "wrote $out: ${size_mib} MiB, kernel $kver, partition 1 ${p1_mib} MiB FAT16, data partition at $(( (P1_START + p1_sectors) * 512 )) bytes"
