#!/bin/sh
# host-gw by hand: a route to every other Node's podCIDR through its InternalIP on the
# segment, kept current every two seconds (what the agent will do from its desired config).
set -u
P=/run/handjoin
OWN=$1
K="$P/kubectl --kubeconfig $P/nodes.kubeconfig"
while :; do
	# (Nodes only gain routes here; a deleted Node's route stays until the next boot.)
	$K get nodes -o 'jsonpath={range .items[*]}{.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' 2>/tmp/routes.err |
		while read -r cidr ip _; do
			[ -n "$cidr" ] && [ -n "$ip" ] && [ "$cidr" != "$OWN" ] || continue
			ip route show "$cidr" | grep -qF "via $ip " && continue
			ip route replace "$cidr" via "$ip" && echo "handjoin: route $cidr via $ip" >/dev/console
		done
	[ -s /tmp/routes.err ] && echo "handjoin: routes: $(cat /tmp/routes.err)" >/dev/console
	sleep 2
done
