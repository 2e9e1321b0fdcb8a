#!/bin/sh
# Creates the MLflow user that Ray jobs log as, or resets its password if it exists; safe to re-run.
# Reads MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD (an admin) and MLFLOW_USER_NAME/PASSWORD.
# Credentials go to curl on stdin, never on its command line.
set -eu

api="${MLFLOW_TRACKING_URI%/}/api/2.0/mlflow/users"
body=$(printf '{"username": "%s", "password": "%s"}' "$MLFLOW_USER_NAME" "$MLFLOW_USER_PASSWORD")
response=$(mktemp)
trap 'rm -f "$response"' EXIT

call() { # METHOD PATH -> HTTP status; the response body goes to $response
  printf 'user = "%s:%s"\n' "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD" |
    curl --silent --show-error --config - --request "$1" --header 'Content-Type: application/json' \
      --data "$body" --output "$response" --write-out '%{http_code}' "$api/$2"
}

status=$(call POST create)
if [ "$status" = 200 ]; then
  echo "created MLflow user $MLFLOW_USER_NAME"
elif grep -q RESOURCE_ALREADY_EXISTS "$response"; then
  status=$(call PATCH update-password)
  [ "$status" = 200 ] || { echo "password update failed ($status): $(cat "$response")" >&2; exit 1; }
  echo "MLflow user $MLFLOW_USER_NAME exists; password set"
else
  echo "user creation failed ($status): $(cat "$response")" >&2
  exit 1
fi
