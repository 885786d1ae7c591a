#!/bin/sh
# Least-privilege Nacos accounts for the LLM stack, through the Nacos 2.4+ auth API (auth must be on).
# Idempotent: run it on every deployment (Compose: the nacos-init service; Kubernetes: the nacos-init Job).
#
#   admin "nacos"          initialised with NACOS_ADMIN_PASSWORD while Nacos has no admin yet (Nacos 2.4+
#                          starts without one); later runs only log in with it
#   model-service user     role ROLE_LLM_MODEL_SERVICE: rw on the naming service (register, heartbeat,
#                          deregister), r on the policy config
#   gateway user           role ROLE_LLM_GATEWAY: r on the naming service (discovery only)
#
# Resources are "namespace:group:type/name"; an empty namespace is the public one. Passwords come from the
# environment and are sent in POST/PUT bodies, never in URLs (Nacos logs URLs).
set -eu

: "${NACOS_ADDR:?NACOS_ADDR (host:port of the Nacos HTTP API) is required}"
: "${NACOS_ADMIN_PASSWORD:?NACOS_ADMIN_PASSWORD is required}"
: "${NACOS_MODEL_SERVICE_PASSWORD:?NACOS_MODEL_SERVICE_PASSWORD is required}"
: "${NACOS_GATEWAY_PASSWORD:?NACOS_GATEWAY_PASSWORD is required}"
MS_USER="${NACOS_MODEL_SERVICE_USERNAME:-model-service}"
GW_USER="${NACOS_GATEWAY_USERNAME:-llm-gateway}"
NAMESPACE="${NACOS_NAMESPACE:-}"        # "" = public
GROUP="${NACOS_GROUP:-DEFAULT_GROUP}"
SERVICE="${MODEL_SERVICE_NAME:-model-service}"
DATA_ID="${NACOS_CONFIG_DATA_ID:-model-service.yaml}"
API="http://${NACOS_ADDR}/nacos/v1"

echo "nacos-init: waiting for Nacos at ${NACOS_ADDR}"
i=0
until curl -fsS -o /dev/null "${API}/console/health/readiness"; do
  i=$((i + 1))
  [ "$i" -lt 90 ] || { echo "nacos-init: Nacos not ready after 180 s" >&2; exit 1; }
  sleep 2
done

login() {  # login USER PASSWORD -> prints the access token (empty on failure)
  curl -sS -X POST "${API}/auth/users/login" --data-urlencode "username=$1" --data-urlencode "password=$2" \
    | sed -n 's/.*"accessToken" *: *"\([^"]*\)".*/\1/p'
}

# Nacos 2.4+ has no default admin password: the first caller sets it (a conflict afterwards is expected).
curl -sS -o /dev/null -X POST "${API}/auth/users/admin" --data-urlencode "password=${NACOS_ADMIN_PASSWORD}" || true
TOKEN="$(login nacos "${NACOS_ADMIN_PASSWORD}")"
if [ -z "$TOKEN" ]; then
  echo "nacos-init: cannot log in as the admin 'nacos' with NACOS_ADMIN_PASSWORD (is Nacos auth on? was the" \
       "admin password set to something else earlier?)" >&2
  exit 1
fi

admin() {  # admin METHOD PATH [curl args...]: one call as the admin; prints the HTTP status
  method="$1"; path="$2"; shift 2
  curl -sS -o /tmp/nacos-init.out -w '%{http_code}' -X "$method" -H "Authorization: Bearer ${TOKEN}" "${API}${path}" "$@"
}

ensure_user() {  # ensure_user NAME PASSWORD: create if missing (refused when it exists: fine), then set the
                 # password, so that a changed secret takes effect on the next run
  admin POST /auth/users --data-urlencode "username=$1" --data-urlencode "password=$2" >/dev/null
  status="$(admin PUT /auth/users --data-urlencode "username=$1" --data-urlencode "newPassword=$2")"
  [ "$status" = 200 ] || { echo "nacos-init: cannot create or update user $1 (HTTP $status)" >&2; cat /tmp/nacos-init.out >&2; exit 1; }
  echo "nacos-init: user $1 ok"
}

grant() {  # grant ROLE USER RESOURCE ACTION: bind the role, add the permission (duplicates are refused: fine)
  admin POST /auth/roles --data-urlencode "role=$1" --data-urlencode "username=$2" >/dev/null
  admin POST /auth/permissions --data-urlencode "role=$1" --data-urlencode "resource=$3" --data-urlencode "action=$4" >/dev/null
  echo "nacos-init: $1 ($2): $4 on $3"
}

ensure_user "$MS_USER" "$NACOS_MODEL_SERVICE_PASSWORD"
ensure_user "$GW_USER" "$NACOS_GATEWAY_PASSWORD"
grant ROLE_LLM_MODEL_SERVICE "$MS_USER" "${NAMESPACE}:${GROUP}:naming/${SERVICE}" rw
grant ROLE_LLM_MODEL_SERVICE "$MS_USER" "${NAMESPACE}:${GROUP}:config/${DATA_ID}" r
grant ROLE_LLM_GATEWAY "$GW_USER" "${NAMESPACE}:${GROUP}:naming/${SERVICE}" r

# Check what was set up, as the users themselves: both log in, the gateway may read but not register.
GW_TOKEN="$(login "$GW_USER" "$NACOS_GATEWAY_PASSWORD")"
MS_TOKEN="$(login "$MS_USER" "$NACOS_MODEL_SERVICE_PASSWORD")"
[ -n "$GW_TOKEN" ] && [ -n "$MS_TOKEN" ] || { echo "nacos-init: a service user cannot log in" >&2; exit 1; }
ns_query="serviceName=${SERVICE}&groupName=${GROUP}&namespaceId=${NAMESPACE}"
read_status="$(curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${GW_TOKEN}" "${API}/ns/instance/list?${ns_query}")"
write_status="$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer ${GW_TOKEN}" \
  "${API}/ns/instance?${ns_query}&ip=192.0.2.1&port=9&ephemeral=true")"
echo "nacos-init: as $GW_USER: read instances -> HTTP $read_status, register an instance -> HTTP $write_status"
[ "$write_status" = 403 ] || { echo "nacos-init: the gateway user can register instances: permissions are too wide" >&2; exit 1; }
echo "nacos-init: done"
