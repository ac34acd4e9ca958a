#!/bin/sh
# A copy-on-write volume for full-size builds on a filesystem that cannot share blocks (ext4): a sparse file holding
# an XFS filesystem with reflink, mounted at MOUNT. diffship's cache hands files to a build's output as copies
# (store/artifacts.clone_file), which on XFS or btrfs are block-sharing clones, so the cache and the output hold one
# copy of each artifact between them, and the file only takes the blocks written into it.
#
#     sudo sh benchmarks/reflink_volume.sh IMAGE MOUNT [SIZE]     (SIZE: a truncate size, default 200G)
#
# Needs xfsprogs (mkfs.xfs) and loop devices; run it again after a reboot to mount the same image. Files deleted in
# the volume give their blocks back to the disk after `fstrim MOUNT` (the loop device punches holes in the image).
set -eu
image=$1
mount=$2
size=${3:-200G}
if mountpoint -q "$mount"; then
    echo "$mount is already mounted"
    exit 0
fi
if [ ! -f "$image" ]; then
    truncate -s "$size" "$image"
    mkfs.xfs -q -m reflink=1 "$image"
fi
mkdir -p "$mount"
mount -o loop "$image" "$mount"
df -h "$mount"
