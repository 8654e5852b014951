#!/usr/bin/env python3
"""Reads a Delta table the way a user's Python would (the `deltalake` package, its own engine) and
prints what it saw as JSON: version, active files, rows, and distinct (partition, offset) pairs.
S3 settings come from the AWS_* environment variables, as for Strata."""
import json
import os
import sys

from deltalake import DeltaTable, QueryBuilder

url = sys.argv[1]
options = {
    key: os.environ[key]
    for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ALLOW_HTTP")
    if os.environ.get(key)
}
table = DeltaTable(url, storage_options=options)
result = (
    QueryBuilder()
    .register("t", table)
    .execute("select count(*) as n, count(distinct (_partition, _offset)) as d from t")
    .read_all()
)
print(
    json.dumps(
        {
            "version": table.version(),
            "files": len(table.file_uris()),
            "rows": result.column("n")[0].as_py(),
            "distinct_offsets": result.column("d")[0].as_py(),
        }
    )
)
