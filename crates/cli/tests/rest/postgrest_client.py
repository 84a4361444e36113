"""Runs queries through postgrest-py (PyPI `postgrest`, the client supabase-py uses) against
lakesync's /rest/v1 and prints each answer as one JSON line: {name, data, count, error}.
Usage: python postgrest_client.py <base url, e.g. http://127.0.0.1:8080/rest/v1>
"""
import json
import sys

from postgrest import APIError, SyncPostgrestClient

url = sys.argv[1]
client = SyncPostgrestClient(url)
crm = SyncPostgrestClient(url, schema="crm")
t = lambda: client.from_("orders")  # noqa: E731

queries = {
    "eq_order": lambda: t().select("id").eq("status", "new").order("id", desc=True),
    "in_list": lambda: t().select("id").in_("status", ["new", "Shipped late"]).order("id"),
    "ilike_gte": lambda: t().select("id").ilike("status", "%shipped%").gte("total", 10).order("total", desc=True).order("id"),
    "is_null": lambda: t().select("id").is_("note", "null").order("id"),
    "or_nested": lambda: t().select("id").or_("status.eq.cancelled,and(id.gt.15,total.lt.12)").order("id"),
    "range_count": lambda: t().select("id", count="exact").order("id").range(2, 5),
    "single": lambda: t().select("order_id:id,status").eq("id", 2).single(),
    "unknown_column": lambda: t().select("id").eq("nope", 1),
    "other_schema": lambda: crm.from_("orders").select("*"),
    "update": lambda: t().update({"status": "x"}).eq("id", 1),
}

for name, query in queries.items():
    try:
        r = query().execute()
        answer = {"name": name, "data": r.data, "count": r.count, "error": None}
    except APIError as e:
        answer = {"name": name, "data": None, "count": None, "error": {"code": e.code, "message": e.message}}
    print(json.dumps(answer), flush=True)
