"""MLflow's request-header plugin: the login `clients.mlflow_client` was given.

MLflow's client takes a login only from environment variables or a file in the home
folder. This provider (entry point `mlflow.request_header_provider`) adds it to every
request instead, the REST API and the artifact uploads and downloads alike, without
changing the process's environment. A login from MLflow's own variables (what
`mnistops stack env` exports) takes precedence where set. No imports: MLflow loads this
module in every process that imports it.
"""


class Login:
    """The login of the MLflow server this process works with (one per process)."""

    header: str | None = None


class LoginHeaders:
    def in_context(self) -> bool:
        return Login.header is not None

    def request_headers(self) -> dict[str, str]:
        return {"Authorization": Login.header} if Login.header else {}
