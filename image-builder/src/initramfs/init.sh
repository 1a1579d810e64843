#!/bin/sh
# Tether initramfs /init (busybox ash). Finds the rootfs, verifies it with dm-verity against
# the root hash on the kernel command line, mounts it read-only with overlays for /etc and
# /var and hands over to systemd. It never mounts an unverified rootfs: any failure prints
# "REFUSING TO BOOT: <why>" on every console and halts. See docs/image.md.
export PATH=/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev

say() { echo "tether-initramfs: $*" > /dev/console; }
fail() {
	# /dev/kmsg reaches every console= (the serial line too), /dev/console only the last.
	echo "<0>tether-initramfs: REFUSING TO BOOT: $*" > /dev/kmsg
	say "REFUSING TO BOOT: $*"
	while true; do sleep 3600; done
}

ROOT= FSTYPE= ROOTHASH= HASHOFFSET= STATE=
for word in $(cat /proc/cmdline); do
	case "$word" in
	tether.root=*) ROOT=${word#*=} ;;
	tether.rootfstype=*) FSTYPE=${word#*=} ;;
	tether.verity.roothash=*) ROOTHASH=${word#*=} ;;
	tether.verity.hashoffset=*) HASHOFFSET=${word#*=} ;;
	tether.state=*) STATE=${word#*=} ;;
	esac
done
[ -n "$ROOT" ] || fail "no tether.root= on the kernel command line"
[ -n "$ROOTHASH" ] || fail "no tether.verity.roothash= on the kernel command line; an unverified rootfs is never mounted"
[ -n "$HASHOFFSET" ] || fail "no tether.verity.hashoffset= on the kernel command line"
case "$FSTYPE" in squashfs|erofs) ;; *) fail "tether.rootfstype=$FSTYPE is not squashfs or erofs" ;; esac

while read -r module; do
	insmod "/lib/modules/$module" 2>/dev/null
done < /etc/initramfs-modules

# A partition by GPT name, found through sysfs (there is no udev here).
find_partlabel() {
	for uevent in /sys/class/block/*/uevent; do
		if grep -qx "PARTNAME=$1" "$uevent"; then
			echo "/dev/$(sed -n 's/^DEVNAME=//p' "$uevent")"
			return 0
		fi
	done
	return 1
}

FULLREAD=
case "$ROOT" in
file:*)
	IMAGE=${ROOT#file:}
	[ -f "$IMAGE" ] || fail "rootfs $IMAGE not found: pass it as a second initrd (iPXE: initrd rootfs.img $IMAGE)"
	DEV=$(losetup -f) && losetup -r "$DEV" "$IMAGE" || fail "cannot attach $IMAGE to a loop device"
	# The rootfs sits in RAM; reading it once through dm-verity proves all of it before boot.
	FULLREAD=1
	;;
PARTLABEL=*)
	LABEL=${ROOT#PARTLABEL=}
	tries=0
	until DEV=$(find_partlabel "$LABEL"); do
		tries=$((tries + 1))
		[ $tries -lt 100 ] || fail "no partition named $LABEL appeared within 30 s"
		sleep 0.3
	done
	;;
*) fail "tether.root=$ROOT is neither file:PATH nor PARTLABEL=NAME" ;;
esac

say "verifying $DEV against root hash $ROOTHASH"
export DM_DISABLE_UDEV=1
veritysetup open "$DEV" tether-root "$DEV" "$ROOTHASH" --hash-offset="$HASHOFFSET" 2>/tmp/verity.err ||
	fail "dm-verity rejected the rootfs: $(cat /tmp/verity.err)"
if [ -n "$FULLREAD" ]; then
	dd if=/dev/mapper/tether-root of=/dev/null bs=1M 2>/tmp/read.err ||
		fail "rootfs does not match root hash $ROOTHASH (dm-verity found a corrupted block: $(tail -n 1 /tmp/read.err))"
fi
say "rootfs verified"

mkdir -p /sysroot
mount -t "$FSTYPE" -o ro /dev/mapper/tether-root /sysroot || fail "cannot mount the verified rootfs as $FSTYPE"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /sysroot/run || fail "cannot mount /run"
OVERLAY=/sysroot/run/tether/overlay
if [ -n "$STATE" ]; then
	SDEV=$(find_partlabel "${STATE#PARTLABEL=}") || fail "state partition $STATE not found"
	mkdir -p /sysroot/run/tether/state
	mount -t ext4 -o nosuid,nodev "$SDEV" /sysroot/run/tether/state || fail "cannot mount state partition $SDEV"
	OVERLAY=/sysroot/run/tether/state/overlay
fi
for dir in etc var; do
	mkdir -p "$OVERLAY/$dir/upper" "$OVERLAY/$dir/work"
	mount -t overlay overlay -o "lowerdir=/sysroot/$dir,upperdir=$OVERLAY/$dir/upper,workdir=$OVERLAY/$dir/work" "/sysroot/$dir" ||
		fail "cannot mount the /$dir overlay"
done
# containerd's snapshots are overlay mounts, which cannot stack on the /var overlay: its
# state lives beside the overlays (RAM on a diskless node, the state partition on a disk).
CONTAINERD=${OVERLAY%/overlay}/containerd
mkdir -p "$CONTAINERD" /sysroot/var/lib/containerd
mount -o bind "$CONTAINERD" /sysroot/var/lib/containerd || fail "cannot mount containerd's state"

mount --move /dev /sysroot/dev
umount /proc /sys
exec switch_root /sysroot /sbin/init
