#!/bin/bash
# The test webhook image's handler: socat runs it once per TLS connection with the HTTP/1.1
# request on stdin. It answers the AdmissionReview: allowed, except objects named `deny-*`,
# and logs each call to stderr (the container's log).
len=0
while IFS= read -r line; do
  line=${line%$'\r'}
  [ -z "$line" ] && break
  case "${line,,}" in content-length:*) len=${line#*:}; len=${len// /} ;; esac
done
body=$(head -c "$len")
uid=$(printf '%s' "$body" | grep -o '"uid":"[^"]*"' | head -n1 | cut -d'"' -f4)
allowed=true
status=""
case "$body" in
  *'"name":"deny-'*) allowed=false; status=',"status":{"code":403,"message":"denied by the tether test webhook"}' ;;
esac
resp="{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":\"$uid\",\"allowed\":$allowed$status}}"
echo "webhook called: uid=$uid allowed=$allowed" >&2
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' "${#resp}" "$resp"
