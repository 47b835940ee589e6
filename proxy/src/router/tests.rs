//! Pattern matching, route order, per-client tables and rewrites.

use super::*;

fn config(routes: &str) -> Config {
    let text = format!(
        r#"
[services.a]
urls = ["http://127.0.0.1:1"]
[services.b]
urls = ["http://127.0.0.1:2"]
[[clients]]
name = "web"
[[clients]]
name = "mobile"
{routes}"#
    );
    Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn find(
    router: &Router,
    client: usize,
    method: &str,
    path: &str,
) -> Result<(String, Vec<(String, String)>), RouteError> {
    let m = Method::from_bytes(method.as_bytes()).expect("test method");
    router.find(client, &m, path).map(|(r, p)| {
        (
            r.id.to_string(),
            p.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        )
    })
}

#[test]
fn same_path_routes_per_client() {
    let cfg = config(
        r#"
[[routes]]
id = "mobile-home"
clients = ["mobile"]
path = "/api/home"
service = "b"
[[routes]]
id = "home"
path = "/api/home"
service = "a"
"#,
    );
    let r = Router::build(&cfg, Vec::new());
    assert_eq!(
        find(&r, 0, "GET", "/api/home").map(|x| x.0),
        Ok("home".into())
    );
    assert_eq!(
        find(&r, 1, "GET", "/api/home").map(|x| x.0),
        Ok("mobile-home".into())
    );
    assert_eq!(find(&r, 0, "GET", "/api/other"), Err(RouteError::NotFound));
    assert_eq!(find(&r, 7, "GET", "/api/home"), Err(RouteError::NotFound));
}

#[test]
fn params_prefix_and_order() {
    let cfg = config(
        r#"
[[routes]]
id = "me"
path = "/users/me"
service = "a"
[[routes]]
id = "user"
path = "/users/{id}"
service = "a"
rewrite = "/v2/users/{id}/profile"
[[routes]]
id = "order-item"
path = "/users/{id}/orders/{order}"
service = "a"
[[routes]]
id = "static"
path = "/static/{*rest}"
service = "b"
rewrite = "/assets/{rest}"
"#,
    );
    let r = Router::build(&cfg, Vec::new());
    assert_eq!(
        find(&r, 0, "GET", "/users/me").map(|x| x.0),
        Ok("me".into())
    );
    let (id, params) = find(&r, 0, "GET", "/users/42").expect("matches");
    assert_eq!(id, "user");
    assert_eq!(params, [("id".to_string(), "42".to_string())]);
    let route = &r.routes[1];
    let p: Params = vec![("id".into(), "42".into())];
    assert_eq!(route.upstream_path("/users/42", &p), "/v2/users/42/profile");
    assert_eq!(
        find(&r, 0, "GET", "/users/"),
        Err(RouteError::NotFound),
        "empty param"
    );
    assert_eq!(
        find(&r, 0, "GET", "/users/7/orders/o-1").map(|x| x.1),
        Ok(vec![
            ("id".into(), "7".into()),
            ("order".into(), "o-1".into())
        ])
    );
    for (path, rest) in [
        ("/static", ""),
        ("/static/", ""),
        ("/static/css/app.css", "css/app.css"),
    ] {
        assert_eq!(
            find(&r, 0, "GET", path),
            Ok(("static".into(), vec![("rest".into(), rest.into())])),
            "{path}"
        );
    }
    assert_eq!(find(&r, 0, "GET", "/staticx"), Err(RouteError::NotFound));
    let p: Params = vec![("rest".into(), "css/app.css".into())];
    assert_eq!(
        r.routes[3].upstream_path("/static/css/app.css", &p),
        "/assets/css/app.css"
    );
}

#[test]
fn methods_and_405() {
    let cfg = config(
        r#"
[[routes]]
id = "read"
methods = ["GET"]
path = "/items/{id}"
service = "a"
[[routes]]
id = "write"
methods = ["PUT", "DELETE"]
path = "/items/{id}"
service = "b"
"#,
    );
    let r = Router::build(&cfg, Vec::new());
    assert_eq!(
        find(&r, 0, "HEAD", "/items/1").map(|x| x.0),
        Ok("read".into())
    );
    assert_eq!(
        find(&r, 0, "PUT", "/items/1").map(|x| x.0),
        Ok("write".into())
    );
    assert_eq!(
        find(&r, 0, "POST", "/items/1"),
        Err(RouteError::MethodNotAllowed {
            allow: "DELETE, GET, HEAD, PUT".into()
        })
    );
}

#[test]
fn pattern_errors() {
    for (pattern, err) in [
        ("api", "a path pattern starts with `/`"),
        (
            "/a//b",
            "the pattern must be normalized (no `//`, `.` or `..`)",
        ),
        (
            "/a/../b",
            "the pattern must be normalized (no `//`, `.` or `..`)",
        ),
        (
            "/{1x}",
            "`{1x}`: a parameter name is letters, digits and `_`",
        ),
        ("/a%2f", "`a%2f` contains a character paths cannot route on"),
    ] {
        assert_eq!(Pattern::parse(pattern), Err(err.to_string()), "{pattern}");
    }
    assert!(Pattern::parse("/").is_ok());
    assert!(Pattern::parse("/a/").is_ok());
}

#[test]
fn template_errors() {
    assert!(Template::parse("/x/{id").is_err());
    assert!(Template::parse("/x/id}").is_err());
    assert!(Template::parse("x").is_err());
    assert!(Template::parse("/x/{a b}").is_err());
    let t = Template::parse("/v1/{a}-{*b}").expect("valid");
    assert_eq!(t.vars().collect::<Vec<_>>(), ["a", "b"]);
}
