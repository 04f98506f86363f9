#!/usr/bin/env bash
# An application in plain shell that answers fota's authorization requests over the control
# socket, with socat (Debian package socat) and no JSON library: each message is one line.
#
#   examples/control.sh [SOCKET] [BUSY_FILE]
#
# While BUSY_FILE exists it defers each request by 10 minutes; otherwise it authorizes. It
# exits when an update ends: status 0 on success, 1 otherwise.
set -euo pipefail
sock=${1:-${FOTA_CONTROL_SOCKET:-/run/fota/control.sock}}
busy=${2:-/run/app/busy}

coproc FOTA { exec socat - "UNIX-CONNECT:$sock"; }
send() { printf '%s\n' "$1" >&"${FOTA[1]}"; }

send '{"id":1,"op":"subscribe","events":["authorization_needed","completed","failed"],"answers":true}'
while IFS= read -r line <&"${FOTA[0]}"; do
  case $line in
    '{"id":1,"ok":true'*) echo "app: subscribed" ;;
    *'"event":"authorization_needed"'*)
      step=$(sed -n 's/.*"step":"\([a-z]*\)".*/\1/p' <<<"$line")
      if [ -e "$busy" ]; then
        send '{"op":"defer","for":600,"reason":"busy"}'
        echo "app: busy, $step deferred"
      else
        send '{"op":"authorize"}'
        echo "app: $step authorized"
      fi ;;
    *'"event":"completed"'*) echo "app: update completed"; exit 0 ;;
    *'"event":"failed"'*) echo "app: update failed: $line"; exit 1 ;;
    *'"ok":false'*) echo "app: refused: $line" >&2 ;;
  esac
done
echo "app: the daemon closed the connection" >&2
exit 1
