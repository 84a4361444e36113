//! The data API in PostgREST's dialect (`/rest/v1`), over HTTP against `lakesync serve`: each
//! answer compared with the same query in SQL, plus the headers, errors and refused writes
//! PostgREST clients rely on.

use serde_json::{json, Value};

use crate::serve::{http, http_with, Server};
use crate::support::{PyDelta, TestDb};

/// `public.orders` (id, status, total, note) synced from a Delta table, and `crm.orders`, a
/// second table of the same name in another schema.
fn served_orders(db: &TestDb, dir: &std::path::Path) -> (Server, PyDelta) {
    let t = PyDelta::new();
    let schema =
        json!([["id", "pa.int64()"], ["status", "pa.string()"], ["total", "pa.float64()"], ["note", "pa.string()"]]);
    let rows: Vec<Value> = (1..=20)
        .map(|i| {
            let status = ["new", "shipped", "Shipped late", "cancelled"][i % 4];
            let note = if i % 5 == 0 { Value::Null } else { json!(format!("note {i}")) };
            json!([i, status, (i * 7 % 23) as f64 + 0.5, note])
        })
        .collect();
    t.run(json!([{"op": "create", "schema": schema, "rows": rows}]));
    let other = PyDelta::new();
    other.run(
        json!([{"op": "create", "schema": [["id", "pa.int64()"], ["region", "pa.string()"]], "rows": [[1, "emea"]]}]),
    );
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\n\
         [[tables]]\nsource = \"{}\"\ntarget = \"public.orders\"\nprimary_key = [\"id\"]\nmode = \"triggered\"\n\n\
         [[tables]]\nsource = \"{}\"\ntarget = \"crm.orders\"\nprimary_key = [\"id\"]\nmode = \"triggered\"\n",
        t.path().display(),
        other.path().display()
    );
    let server = Server::start(db, &config, dir);
    server.wait_for("both tables to sync", std::time::Duration::from_secs(60), || {
        ["public.orders", "crm.orders"].iter().all(|n| server.table(n)["synced_version"] == 0)
    });
    (server, t)
}

fn ids(reply: &crate::serve::Reply) -> Vec<String> {
    reply.json().as_array().unwrap().iter().map(|r| r["id"].to_string()).collect()
}

#[test]
fn postgrest_queries_answer_what_the_same_sql_answers() {
    let db = TestDb::new("cli_rest");
    let dir = tempfile::tempdir().unwrap();
    let (server, _t) = served_orders(&db, dir.path());
    let get = |path: &str| http_with(&server.addr, "GET", path, &[]);
    // (PostgREST query, the same in SQL)
    let cases = [
        ("status=eq.new&order=id.desc", "status = 'new' ORDER BY id DESC"),
        ("status=in.(new,%22Shipped%20late%22)&order=id", "status IN ('new', 'Shipped late') ORDER BY id"),
        (
            "status=ilike.*shipped*&total=gte.10&order=total.desc,id",
            "status ILIKE '%shipped%' AND total >= 10 ORDER BY total DESC, id",
        ),
        ("note=is.null&order=id", "note IS NULL ORDER BY id"),
        ("note=not.is.null&id=lt.6&order=id", "note IS NOT NULL AND id < 6 ORDER BY id"),
        (
            "or=(status.eq.cancelled,and(id.gt.15,total.lt.12))&order=id",
            "(status = 'cancelled' OR (id > 15 AND total < 12)) ORDER BY id",
        ),
        ("status=not.like.*a*&order=id", "status NOT LIKE '%a%' ORDER BY id"),
        ("not.or=(id.lt.5,id.gt.8)&order=id", "NOT (id < 5 OR id > 8) ORDER BY id"),
        ("order=note.desc.nullsfirst,id&limit=4&offset=2", "true ORDER BY note DESC NULLS FIRST, id LIMIT 4 OFFSET 2"),
    ];
    for (rest, sql) in cases {
        let reply = get(&format!("/rest/v1/orders?select=id&{rest}"));
        assert_eq!(reply.status, 200, "{rest}: {}", reply.body);
        let expected: Vec<String> = db
            .rows(&format!("SELECT id FROM public.orders WHERE {sql}"))
            .iter()
            .map(|r| r.trim_matches(['(', ')']).to_string())
            .collect();
        assert_eq!(ids(&reply), expected, "{rest}");
    }
    // select with an alias, and the version the rows reflect.
    let reply = get("/rest/v1/orders?select=order_id:id,status&id=eq.3");
    assert_eq!(reply.json(), json!([{"order_id": 3, "status": "cancelled"}]));
    assert_eq!(reply.headers["x-lakesync-version"], "0");
    assert!(reply.headers.contains_key("x-lakesync-commit-timestamp"));
    assert_eq!(reply.headers["content-range"], "0-0/*");
    // PostgREST's OpenAPI document for the schema's synced tables.
    let doc = get("/rest/v1/").json();
    assert_eq!(doc["swagger"], "2.0");
    assert_eq!(doc["definitions"]["orders"]["properties"]["id"]["type"], "integer");
    assert_eq!(doc["definitions"]["orders"]["properties"]["total"]["type"], "number");
    assert_eq!(doc["definitions"]["orders"]["required"], json!(["id"]));
    assert!(doc["paths"]["/orders"]["get"]["parameters"].as_array().unwrap().len() >= 4 + 7, "{doc}");
    let crm = http_with(&server.addr, "GET", "/rest/v1/", &[("Accept-Profile", "crm")]).json();
    assert_eq!(crm["definitions"]["orders"]["properties"]["region"]["type"], "string");
    // Another schema through Accept-Profile.
    let reply = http_with(&server.addr, "GET", "/rest/v1/orders", &[("Accept-Profile", "crm")]);
    assert_eq!(reply.json(), json!([{"id": 1, "region": "emea"}]));
}

#[test]
fn counts_ranges_single_objects_csv_errors_and_refused_writes_speak_postgrest() {
    let db = TestDb::new("cli_rest_headers");
    let dir = tempfile::tempdir().unwrap();
    let (server, _t) = served_orders(&db, dir.path());
    let with = |path: &str, headers: &[(&str, &str)]| http_with(&server.addr, "GET", path, headers);

    // Counts and ranges.
    let reply = with("/rest/v1/orders?select=id&order=id", &[("Prefer", "count=exact"), ("Range", "0-4")]);
    assert_eq!(reply.status, 206, "{}", reply.body);
    assert_eq!(reply.headers["content-range"], "0-4/20");
    assert_eq!(ids(&reply), ["1", "2", "3", "4", "5"]);
    let reply = with("/rest/v1/orders?status=eq.new", &[("Prefer", "count=exact")]);
    assert_eq!((reply.status, reply.headers["content-range"].as_str()), (200, "0-4/5"));
    let reply = with("/rest/v1/orders?limit=1", &[("Prefer", "count=planned")]);
    let planned: i64 = reply.headers["content-range"].split('/').nth(1).unwrap().parse().unwrap();
    assert!(planned > 0, "{:?}", reply.headers);
    let reply = with("/rest/v1/orders", &[("Prefer", "count=exact"), ("Range", "30-39")]);
    assert_eq!(reply.status, 416, "{}", reply.body);
    assert_eq!(reply.json()["code"], "PGRST103");
    assert_eq!(reply.headers["content-range"], "*/20");
    assert_eq!(with("/rest/v1/orders", &[("Range", "9-2")]).status, 416);
    let head = http_with(&server.addr, "HEAD", "/rest/v1/orders?status=eq.new", &[("Prefer", "count=exact")]);
    assert_eq!((head.status, head.body.as_str(), head.headers["content-range"].as_str()), (200, "", "0-4/5"));

    // One object, or 406.
    let object = [("Accept", "application/vnd.pgrst.object+json")];
    let reply = with("/rest/v1/orders?id=eq.2&select=id,status", &object);
    assert_eq!((reply.status, reply.json()), (200, json!({"id": 2, "status": "Shipped late"})));
    let reply = with("/rest/v1/orders?status=eq.new", &object);
    assert_eq!(reply.status, 406);
    assert_eq!(reply.json()["code"], "PGRST116");
    assert_eq!(reply.json()["details"], "The result contains 5 rows");

    // CSV.
    let reply = with("/rest/v1/orders?select=id,note&id=in.(4,5)&order=id", &[("Accept", "text/csv")]);
    assert_eq!(reply.headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(reply.body, "id,note\n4,note 4\n5,\n");

    // Errors, PostgREST-shaped.
    let error = |path: &str| {
        let r = with(path, &[]);
        let body = r.json();
        assert!(body.get("message").is_some() && body.get("details").is_some() && body.get("hint").is_some(), "{body}");
        (r.status, body["code"].as_str().unwrap().to_string())
    };
    assert_eq!(error("/rest/v1/orders?nope=eq.1"), (400, "42703".into()));
    assert_eq!(error("/rest/v1/orders?id=eq.abc"), (400, "22P02".into()));
    assert_eq!(error("/rest/v1/orders?id=between.1"), (400, "PGRST100".into()));
    assert_eq!(error("/rest/v1/nothing"), (404, "PGRST205".into()));

    // Writes are refused and change nothing.
    for method in ["POST", "PATCH", "PUT", "DELETE"] {
        let reply = http(&server.addr, method, "/rest/v1/orders?id=eq.1", None, Some(&json!({"status": "x"})));
        assert_eq!(reply.status, 405, "{method}: {}", reply.body);
        assert_eq!(reply.json()["code"], "42501");
    }
    assert_eq!(db.value("SELECT status FROM public.orders WHERE id = 1"), "shipped");
    assert_eq!(db.value("SELECT count(*) FROM public.orders"), "20");
}

/// The node package directory holding `@supabase/postgrest-js` (installed once per machine by
/// `scripts/test`, named by `LAKESYNC_TEST_POSTGREST_JS`).
fn postgrest_js() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("LAKESYNC_TEST_POSTGREST_JS") {
        return dir.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    ["/opt/lakesync-test-postgrest-js".to_string(), format!("{home}/.cache/lakesync-test-postgrest-js")]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.join("node_modules/@supabase/postgrest-js").exists())
        .unwrap_or_else(|| {
            panic!("@supabase/postgrest-js is not installed; run `bash scripts/test` (it installs it once)")
        })
}

/// A client script's answers (one JSON line each, `{name, data, count, error, ...}`) by name.
fn answers_of(out: &std::process::Output, client: &str) -> std::collections::HashMap<String, Value> {
    assert!(
        out.status.success(),
        "{} (is {client} installed? `bash scripts/test` installs it)",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect()
}

/// The data of answer `name`, which must not be an error.
fn data_of(answers: &std::collections::HashMap<String, Value>, name: &str) -> Value {
    let a = &answers[name];
    assert!(a["error"].is_null(), "{name}: {a}");
    a["data"].clone()
}

/// `[{"id": ..}, ...]` of `public.orders` rows matching `sql` (a WHERE clause and its order).
fn sql_ids(db: &TestDb, sql: &str) -> Value {
    db.rows(&format!("SELECT id FROM public.orders WHERE {sql}"))
        .iter()
        .map(|r| json!({"id": r.trim_matches(['(', ')']).parse::<i64>().unwrap()}))
        .collect()
}

/// `@supabase/postgrest-js`, the client supabase-js is built on, against `/rest/v1`: every
/// answer (data, count, error, status) is what the same SQL gives, and writes come back as
/// errors with nothing changed.
#[test]
fn postgrest_js_reads_lakesync_as_it_reads_postgrest() {
    let db = TestDb::new("cli_rest_js");
    let dir = tempfile::tempdir().unwrap();
    let (server, _t) = served_orders(&db, dir.path());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rest/postgrest_client.js");
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/rest/v1", server.addr))
        .env("NODE_PATH", postgrest_js().join("node_modules"))
        .output()
        .expect("node");
    let answers = answers_of(&out, "node and @supabase/postgrest-js");
    let (data, sql_ids) = (|name: &str| data_of(&answers, name), |sql: &str| sql_ids(&db, sql));
    assert_eq!(data("eq_order"), sql_ids("status = 'new' ORDER BY id DESC"));
    assert_eq!(data("in_list"), sql_ids("status IN ('new', 'Shipped late') ORDER BY id"));
    assert_eq!(data("ilike_gte"), sql_ids("status ILIKE '%shipped%' AND total >= 10 ORDER BY total DESC, id"));
    assert_eq!(data("is_null"), sql_ids("note IS NULL ORDER BY id"));
    assert_eq!(data("not_null"), sql_ids("note IS NOT NULL AND id < 6 ORDER BY id"));
    assert_eq!(data("or_nested"), sql_ids("status = 'cancelled' OR (id > 15 AND total < 12) ORDER BY id"));
    assert_eq!(data("range_count"), sql_ids("true ORDER BY id LIMIT 4 OFFSET 2"));
    assert_eq!(answers["range_count"]["count"], 20);
    assert_eq!(
        (answers["head_count"]["count"].clone(), answers["head_count"]["data"].clone()),
        (json!(5), Value::Null)
    );
    assert_eq!(data("single"), json!({"order_id": 2, "status": "Shipped late"}));
    assert_eq!(answers["single_many"]["error"]["code"], "PGRST116", "{}", answers["single_many"]);
    assert_eq!(data("maybe_none"), Value::Null);
    assert_eq!(data("csv"), json!("id,note\n4,note 4\n5,\n"));
    assert_eq!(answers["unknown_column"]["error"]["code"], "42703", "{}", answers["unknown_column"]);
    assert_eq!(answers["bad_value"]["error"]["code"], "22P02", "{}", answers["bad_value"]);
    assert_eq!(data("other_schema"), json!([{"id": 1, "region": "emea"}]));
    for write in ["insert", "update", "delete"] {
        assert_eq!(answers[write]["status"], 405, "{write}: {}", answers[write]);
        assert_eq!(answers[write]["error"]["code"], "42501", "{write}: {}", answers[write]);
    }
    assert_eq!(db.value("SELECT count(*) FROM public.orders WHERE status = 'x' OR id = 100"), "0");
}

/// postgrest-py (PyPI `postgrest`, what supabase-py is built on), the same way.
#[test]
fn postgrest_py_reads_lakesync_as_it_reads_postgrest() {
    let db = TestDb::new("cli_rest_py");
    let dir = tempfile::tempdir().unwrap();
    let (server, _t) = served_orders(&db, dir.path());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rest/postgrest_client.py");
    let out = std::process::Command::new(crate::support::python())
        .arg(&script)
        .arg(format!("http://{}/rest/v1", server.addr))
        .output()
        .expect("python");
    let answers = answers_of(&out, "postgrest-py");
    let (data, sql_ids) = (|name: &str| data_of(&answers, name), |sql: &str| sql_ids(&db, sql));
    assert_eq!(data("eq_order"), sql_ids("status = 'new' ORDER BY id DESC"));
    assert_eq!(data("in_list"), sql_ids("status IN ('new', 'Shipped late') ORDER BY id"));
    assert_eq!(data("ilike_gte"), sql_ids("status ILIKE '%shipped%' AND total >= 10 ORDER BY total DESC, id"));
    assert_eq!(data("is_null"), sql_ids("note IS NULL ORDER BY id"));
    assert_eq!(data("or_nested"), sql_ids("status = 'cancelled' OR (id > 15 AND total < 12) ORDER BY id"));
    assert_eq!(data("range_count"), sql_ids("true ORDER BY id LIMIT 4 OFFSET 2"));
    assert_eq!(answers["range_count"]["count"], 20);
    assert_eq!(data("single"), json!({"order_id": 2, "status": "Shipped late"}));
    assert_eq!(answers["unknown_column"]["error"]["code"], "42703", "{}", answers["unknown_column"]);
    assert_eq!(data("other_schema"), json!([{"id": 1, "region": "emea"}]));
    assert_eq!(answers["update"]["error"]["code"], "42501", "{}", answers["update"]);
    assert_eq!(db.value("SELECT status FROM public.orders WHERE id = 1"), "shipped");
}

/// An HS256 JWT of `claims` signed with `secret` (Python's standard library signs it: an
/// implementation independent of lakesync's).
fn jwt(secret: &str, claims: &Value) -> String {
    let code = "import base64, hashlib, hmac, json, sys\n\
        b = lambda d: base64.urlsafe_b64encode(d).rstrip(b'=').decode()\n\
        head = b(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())\n\
        body = b(sys.argv[2].encode())\n\
        sig = b(hmac.new(sys.argv[1].encode(), f'{head}.{body}'.encode(), hashlib.sha256).digest())\n\
        print(f'{head}.{body}.{sig}')";
    let out = std::process::Command::new(crate::support::python())
        .args(["-c", code, secret, &claims.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// PostgREST's authentication model: a JWT's `role` claim is the Postgres role the request's
/// query runs as (`SET LOCAL ROLE`), a request without one runs as `anon_role`, so grants and
/// row-level security policies decide what each caller reads; the token may come as a bearer
/// or in `apikey` (as Supabase clients send it); expired, forged or role-less tokens are 401.
#[test]
fn a_jwts_role_and_row_level_security_decide_what_each_caller_reads() {
    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
    let db = TestDb::new("cli_rest_jwt");
    for role in ["rest_anon", "rest_user", "rest_nobody"] {
        db.execute(&format!(
            "DO $$ BEGIN CREATE ROLE {role} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let t = PyDelta::new();
    let schema = json!([["id", "pa.int64()"], ["owner", "pa.string()"]]);
    t.run(json!([{"op": "create", "schema": schema, "rows": [[1, "u1"], [2, "u2"], [3, "u1"], [4, "public"]]}]));
    let config = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\nread_auth = \"token\"\ntoken_env = \"LAKESYNC_TEST_TOKEN\"\n\
         jwt_secret_env = \"LAKESYNC_TEST_JWT_SECRET\"\nanon_role = \"rest_anon\"\n\n\
         [[tables]]\nsource = \"{}\"\ntarget = \"public.notes\"\nprimary_key = [\"id\"]\nmode = \"triggered\"\n",
        t.path().display()
    );
    let server = Server::start_with_env(&db, &config, dir.path(), &[("LAKESYNC_TEST_JWT_SECRET", SECRET)]);
    server.wait_for("the table to sync", std::time::Duration::from_secs(60), || {
        http(&server.addr, "GET", "/api/v1/synced-tables/public.notes", Some(crate::serve::TOKEN), None).json()
            ["synced_version"]
            == 0
    });
    // The owner's grants and policies, as a Supabase project has them.
    db.execute(
        "GRANT SELECT ON public.notes TO rest_anon, rest_user; ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY; \
         CREATE POLICY anon_public ON public.notes FOR SELECT TO rest_anon USING (owner = 'public'); \
         CREATE POLICY own_notes ON public.notes FOR SELECT TO rest_user \
           USING (owner = current_setting('request.jwt.claims', true)::json->>'sub' OR owner = 'public')",
    );
    let ids = |headers: &[(&str, &str)]| {
        let r = http_with(&server.addr, "GET", "/rest/v1/notes?select=id&order=id", headers);
        assert_eq!(r.status, 200, "{headers:?}: {}", r.body);
        assert_eq!(r.headers["x-lakesync-version"], "0");
        ids(&r)
    };
    // Anonymous: the anon role's policy.
    assert_eq!(ids(&[]), ["4"]);
    // u1 and u2 see their own notes and the public one, by bearer or by apikey.
    let u1 = jwt(SECRET, &json!({"role": "rest_user", "sub": "u1", "exp": 4_000_000_000u64}));
    let u2 = jwt(SECRET, &json!({"role": "rest_user", "sub": "u2"}));
    assert_eq!(ids(&[("Authorization", &format!("Bearer {u1}"))]), ["1", "3", "4"]);
    assert_eq!(ids(&[("apikey", &u2)]), ["2", "4"]);
    // A count is counted as the caller too.
    let r = http_with(
        &server.addr,
        "GET",
        "/rest/v1/notes",
        &[("Authorization", &format!("Bearer {u1}")), ("Prefer", "count=exact")],
    );
    assert_eq!(r.headers["content-range"], "0-2/3");

    let refused = |headers: &[(&str, &str)]| {
        let r = http_with(&server.addr, "GET", "/rest/v1/notes", headers);
        (r.status, r.json()["code"].as_str().unwrap_or_default().to_string())
    };
    let expired = jwt(SECRET, &json!({"role": "rest_user", "sub": "u1", "exp": 1_000_000_000u64}));
    assert_eq!(refused(&[("Authorization", &format!("Bearer {expired}"))]), (401, "PGRST303".into()));
    let forged = jwt("another-secret-of-at-least-32-bytes!", &json!({"role": "postgres"}));
    assert_eq!(refused(&[("Authorization", &format!("Bearer {forged}"))]), (401, "PGRST301".into()));
    // A role without the grant, and one that does not exist.
    let nobody = jwt(SECRET, &json!({"role": "rest_nobody"}));
    assert_eq!(refused(&[("Authorization", &format!("Bearer {nobody}"))]), (403, "42501".into()));
    let ghost = jwt(SECRET, &json!({"role": "no_such_role_here"}));
    assert_eq!(refused(&[("Authorization", &format!("Bearer {ghost}"))]), (401, "22023".into()));
    // The management API keeps its own token: a JWT does not open it.
    assert_eq!(http(&server.addr, "GET", "/api/v1/synced-tables", None, None).status, 401);
    // The session is clean for the next caller: the role was LOCAL to its transaction.
    assert_eq!(ids(&[]), ["4"]);
}
