#!/bin/sh
# host-gw by hand: a route to every other Node's podCIDR through its InternalIP on the
# segment, kept current every two seconds (what the agent will do from its desired config).
set -u
P=/run/handjoin
OWN=$1
K="$P/kubectl --kubeconfig $P/nodes.kubeconfig"
while :; do
	$K get nodes -o 'jsonpath={range .items[*]}{.spec.podCIDR} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}' 2>/dev/null |
		while read -r cidr ip; do
			[ -n "$cidr" ] && [ -n "$ip" ] && [ "$cidr" != "$OWN" ] || continue
			ip route show "$cidr" | grep -q "via $ip " && continue
			ip route replace "$cidr" via "$ip" && echo "handjoin: route $cidr via $ip" >/dev/console
		done
	sleep 2
done
