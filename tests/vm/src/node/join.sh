#!/bin/sh
# A machine of the Tether image joined to a tenant by hand, without the agent (issue 9's
# test script; docs/decisions.md "A node joined by hand"). The kernel runs it from the
# first virtio disk (`systemd.run="/bin/sh /dev/vda"`); the second disk is a squashfs of
# what the test prepared: the list of node artifacts in the store, root/ (the node's
# files), kubectl and ctr, a kubeconfig allowed to read Nodes, the CNI conflist template and `env`.
set -eu
P=/run/handjoin
STEP=start
say() { echo "handjoin: $*" >/dev/console; }
step() { STEP=$*; }
trap 'say "FAILED after: $STEP"' EXIT
step mount the payload
mkdir -p $P
mount -t squashfs -o ro /dev/vdb $P
. $P/env
hostname "$NAME"
step wait for the network
# (The generator's unit starts after basic.target, before DHCP is done.)
/lib/systemd/systemd-networkd-wait-online --timeout=120
step download the runtime from the store
# The pinned runtime from the store by digest (`artifacts`: dir, name, sha256, size, blob
# path) with the image's own agent: resumable, checked before it is renamed into place.
mkdir -p /var/lib/tether/bin /var/lib/tether/cni/bin
while read -r dir name digest size path; do
	tries=0
	until tether-agent fetch --url "http://$STORE$path" --sha256 "$digest" --size "$size" \
		"/var/lib/tether/$dir/$name" >/dev/null; do
		tries=$((tries + 1))
		[ $tries -lt 5 ] || exit 1
		sleep 2
	done
done <$P/artifacts
say "runtime downloaded from the store"
step write the node files
# (-R without -a: / itself is the read-only rootfs; /etc and /var are its overlays.)
for top in $P/root/*; do cp -R "$top/." "/${top##*/}/"; done
step start containerd
systemctl daemon-reload
systemctl start containerd.service
say "containerd started"
step import pause from the image
# The image bakes the pause image in; the first pod starts without a pull.
$P/ctr -n k8s.io images import /usr/share/tether/images/pause.tar >/dev/null
step start the kubelet
systemctl start kubelet.service
say "kubelet started"
step wait for the Node and its podCIDR
K="$P/kubectl --kubeconfig $P/nodes.kubeconfig"
tries=0
until CIDR=$($K get node "$NAME" -o 'jsonpath={.spec.podCIDR}' 2>/tmp/podcidr.err) && [ -n "$CIDR" ]; do
	tries=$((tries + 1))
	if [ $tries -ge 300 ]; then
		say "no podCIDR after 300 tries: $(cat /tmp/podcidr.err)"
		exit 1
	fi
	sleep 1
done
step write the CNI network
mkdir -p /etc/cni/net.d
sed "s#@POD_CIDR@#$CIDR#" $P/conflist.in >/etc/cni/net.d/10-tether.conflist
say "pod network $CIDR"
step start the routes
systemd-run --unit=hostgw-routes --property=Restart=always /bin/sh $P/routes.sh "$CIDR"
trap - EXIT
say "joined"
