"""This project's Kedro machinery: the context (:mod:`.context`), the hooks (:mod:`.hooks`) and
MLflow tracking (:mod:`.tracking`)."""
