"""Makes the passwords in MLflow's auth database the current secrets; run before `mlflow server` starts.

MLflow's basic-auth app creates its admin from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD on its first start only and
ignores a changed password afterwards, so a rotated secret would lock the admin out (and the bootstrap Job that
logs in as the admin to re-key the jobs' user). This writes the secrets into the auth database directly, through
MLflow's own user store: the admin's password, and the jobs' user (created if missing) when MLFLOW_USER_NAME and
MLFLOW_USER_PASSWORD are set. It reads the environment and auth config the server reads (MLFLOW_AUTH_CONFIG_PATH);
the Deployment runs it as an init container, tests/integration/test_production_stack.py before each local start.
Safe to re-run; prints no secret.
"""

from __future__ import annotations

import os
import sys

import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.server.auth.config import read_auth_config
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore


def sync(store: SqlAlchemyStore, username: str, password: str, *, is_admin: bool) -> str:
    if not store.has_user(username, use_primary=True):
        try:
            store.create_user(username, password, is_admin=is_admin)
            return "created"
        except MlflowException as e:  # another replica's init container created it first
            if not isinstance(e.__cause__, sqlalchemy.exc.IntegrityError):
                raise
    if store.authenticate_user(username, password, use_primary=True):
        return "unchanged"
    store.update_user(username, password=password)
    return "password set"


def main() -> int:
    config = read_auth_config()
    if not config.admin_username or not config.admin_password:
        print("MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD must be set", file=sys.stderr)
        return 1
    store = SqlAlchemyStore()
    store.init_db(config.database_uri)  # creates or migrates the auth tables, as the server's start does
    admin = config.admin_username
    print(f"MLflow admin {admin}: {sync(store, admin, config.admin_password, is_admin=True)}")
    user, password = os.environ.get("MLFLOW_USER_NAME"), os.environ.get("MLFLOW_USER_PASSWORD")
    if user and password:
        print(f"MLflow user {user}: {sync(store, user, password, is_admin=False)}")
    store.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
