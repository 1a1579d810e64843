#!/bin/sh
# A machine of the Tether image joined to a tenant by hand, without the agent (issue 9's
# test script; docs/decisions.md "A node joined by hand"). The kernel runs it from the
# first virtio disk (`systemd.run="/bin/sh /dev/vda"`); the second disk is a squashfs of
# what the test prepared: bin/ (containerd, runc, kubelet), cni/, root/ (the node's files),
# kubectl, a kubeconfig allowed to read Nodes, the CNI conflist template and `env`.
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
# The pinned runtime, read-only, where the agent will install it.
mkdir -p /var/lib/tether/bin /var/lib/tether/cni/bin
mount -o bind,ro $P/bin /var/lib/tether/bin
mount -o bind,ro $P/cni /var/lib/tether/cni/bin
step write the node files
# (-R without -a: / itself is the read-only rootfs; /etc and /var are its overlays.)
for top in $P/root/*; do cp -R "$top/." "/${top##*/}/"; done
step start containerd
systemctl daemon-reload
systemctl start containerd.service
say "containerd started"
step start the kubelet
systemctl start kubelet.service
say "kubelet started"
step wait for the Node and its podCIDR
K="$P/kubectl --kubeconfig $P/nodes.kubeconfig"
until CIDR=$($K get node "$NAME" -o 'jsonpath={.spec.podCIDR}' 2>/dev/null) && [ -n "$CIDR" ]; do
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
