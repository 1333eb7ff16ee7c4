//! Image references in the distribution grammar, normalized the way Docker does it.
//!
//! ```text
//! reference  := name [ ":" tag ] [ "@" digest ]
//! name       := [ domain "/" ] path-component [ "/" path-component ]*
//! domain     := host [ ":" port ]          (host: DNS name, IPv4, or [IPv6])
//! path-comp  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest     := "sha256:" 64 lowercase hex digits
//! ```
//!
//! The first component is a registry only if it contains a `.` or a `:`, is `localhost`, or
//! has an uppercase letter (Docker's rule); otherwise the name is *short* and belongs to
//! Docker Hub: `alpine` is `docker.io/library/alpine:latest`. Short names can also be searched
//! for in configured registries (see `registry.rs`), which is why the parser remembers whether
//! the user gave a registry at all.
//!
//! The path, tag and digest are parsed by `oci_client::Reference` (oci-spec's grammar).
//! Hand-written on purpose:
//! - the short-name rule above: oci-spec's has no uppercase case and does not say whether
//!   the text named a registry;
//! - the domain check: oci-spec's grammar has no `[IPv6]` hosts, and takes a first component
//!   that is not a valid host name (`exa_mple.com`) as a registry, because it also matches
//!   as a path component;
//! - sha256 only, and the whole name (domain included) at most 255 characters (oci-spec
//!   limits the repository alone).

use std::fmt;

use oci_client::ParseError;

use super::digest::Digest;
use crate::error::{BoxliteError, BoxliteResult};

/// The registry of short names.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];
const MAX_NAME_LEN: usize = 255;
/// Stands in for the domain when oci-spec parses the rest of a reference: a name with a `.`,
/// so oci-spec takes it as the domain and leaves the path as written.
const PLACEHOLDER_DOMAIN: &str = "domain.invalid";

/// A parsed, normalized image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
    /// Whether the text named its registry (else short-name search applies).
    qualified: bool,
}

impl Reference {
    /// Parses `text`; a malformed reference is an `InvalidArgument` error that quotes it.
    pub fn parse(text: &str) -> BoxliteResult<Self> {
        parse(text).map_err(|why| {
            BoxliteError::invalid(
                "image",
                format!("{text:?} is not a valid image reference: {why}"),
            )
        })
    }

    /// The registry host (with port), normalized: Docker Hub is always `docker.io`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag; `latest` when the text gave neither tag nor digest.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether the text named a registry; a short name (`alpine`, `library/alpine`) did not.
    pub fn is_qualified(&self) -> bool {
        self.qualified
    }

    /// The same name and version in another registry (for short-name search): the
    /// repository is kept as Docker Hub would resolve it (`library/alpine`), which is how
    /// registry mirrors serve it.
    pub fn in_registry(&self, registry: &str) -> Self {
        Self {
            registry: normalize_registry(registry),
            qualified: true,
            ..self.clone()
        }
    }

    /// What is asked of the registry: the digest if pinned, else the tag.
    pub fn version(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = BoxliteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `index.docker.io` and friends are Docker Hub; everything else is kept as written.
pub(crate) fn normalize_registry(host: &str) -> String {
    if DOCKER_HUB_ALIASES.contains(&host) {
        DOCKER_HUB.to_owned()
    } else {
        host.to_owned()
    }
}

fn parse(text: &str) -> Result<Reference, String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    // oci-spec's tag pattern (`\w`) would take any Unicode letter; the grammar is ASCII.
    if !text.chars().all(|c| c.is_ascii_graphic()) {
        return Err("it contains whitespace, control or non-ASCII characters".into());
    }
    let (domain, rest) = split_domain(text);
    if let Some(domain) = domain {
        validate_domain(domain)?;
    }
    let parsed = match oci_client::Reference::try_from(format!("{PLACEHOLDER_DOMAIN}/{rest}")) {
        Ok(parsed) => parsed,
        Err(ParseError::DigestUnsupported) => {
            let algorithm = rest
                .rsplit_once('@')
                .and_then(|(_, digest)| digest.split_once(':'))
                .map_or("", |(algorithm, _)| algorithm);
            return Err(unsupported(algorithm));
        }
        Err(e) => return Err(e.to_string()),
    };
    let path = parsed.repository();
    if domain.map_or(0, |d| d.len() + 1) + path.len() > MAX_NAME_LEN {
        return Err(format!("the name is longer than {MAX_NAME_LEN} characters"));
    }
    let digest = parsed.digest().map(parse_digest).transpose()?;
    let qualified = domain.is_some();
    let registry = normalize_registry(domain.unwrap_or(DOCKER_HUB));
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_owned()
    };
    Ok(Reference {
        registry,
        repository,
        // `latest` when the text gave neither tag nor digest, as oci-spec does.
        tag: parsed.tag().map(str::to_owned),
        digest,
        qualified,
    })
}

/// Docker's rule: the first component is a domain if it has a '.' or ':', is `localhost`,
/// or has an uppercase letter (repository names never do). A tag or digest has no '/', so
/// the first '/' of the whole text ends the domain.
fn split_domain(text: &str) -> (Option<&str>, &str) {
    match text.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), rest)
        }
        _ => (None, text),
    }
}

/// oci-spec took the digest's form; only sha256 names blobs here.
fn parse_digest(text: &str) -> Result<Digest, String> {
    match text.split_once(':') {
        Some(("sha256", _)) => Digest::parse(text)
            .map_err(|_| format!("digest {text:?} is not 64 lowercase hex digits")),
        Some((algorithm, _)) => Err(unsupported(algorithm)),
        None => Err(format!("digest {text:?} has no algorithm")),
    }
}

fn unsupported(algorithm: &str) -> String {
    format!("digest algorithm {algorithm:?} is not supported (only sha256)")
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("registry {domain:?} {why}"));
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // [IPv6]:port
        let Some((ip, after)) = rest.split_once(']') else {
            return bad("has an unclosed '['");
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("is not a valid IPv6 address");
        }
        match after {
            "" => (None, None),
            p if p.starts_with(':') => (None, Some(&p[1..])),
            _ => return bad("has characters after ']'"),
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
            return bad("has an invalid port");
        }
    }
    if let Some(host) = host {
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        };
        if !host.split('.').all(component_ok) {
            return bad("is not a valid host name");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(text: &str) -> String {
        Reference::parse(text).unwrap().to_string()
    }

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn short_names_belong_to_docker_hub() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(norm("library/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("bitnami/redis:7"), "docker.io/bitnami/redis:7");
        assert_eq!(
            norm("docker.io/library/alpine:latest"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(norm("docker.io/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            norm("index.docker.io/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert!(!Reference::parse("alpine").unwrap().is_qualified());
        assert!(!Reference::parse("library/alpine").unwrap().is_qualified());
        assert!(Reference::parse("docker.io/alpine").unwrap().is_qualified());
    }

    #[test]
    fn registries_with_ports_digests_and_tags() {
        let r = Reference::parse("127.0.0.1:5000/x/y:tag").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "x/y", Some("tag"))
        );
        assert!(r.is_qualified());
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(norm("[::1]:5000/app:v1"), "[::1]:5000/app:v1");
        // An uppercase first component can only be a host (Docker's rule).
        assert_eq!(norm("Registry/app"), "Registry/app:latest");

        let pinned = format!("ghcr.io/org/app@sha256:{HEX}");
        let r = Reference::parse(&pinned).unwrap();
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.repository(), "org/app");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().hex(), HEX);
        assert_eq!(r.to_string(), pinned);
        assert_eq!(r.version(), format!("sha256:{HEX}"));

        let both = format!("alpine:3.20@sha256:{HEX}");
        let r = Reference::parse(&both).unwrap();
        assert_eq!(r.tag(), Some("3.20"));
        assert_eq!(r.version(), format!("sha256:{HEX}"));
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/alpine:3.20@sha256:{HEX}")
        );
    }

    #[test]
    fn separators_follow_the_grammar() {
        for good in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1/b2/c3", "x.y-z_w"] {
            Reference::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "a___b", "a..b", "a._b", "-a", "a-", "_a", "a/", "/a", "a//b",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn search_registries_keep_the_docker_path() {
        let r = Reference::parse("alpine").unwrap();
        let mirrored = r.in_registry("127.0.0.1:5000");
        assert_eq!(mirrored.to_string(), "127.0.0.1:5000/library/alpine:latest");
        assert!(mirrored.is_qualified());
    }

    #[test]
    fn malformed_references_are_invalid_arguments_quoting_them() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "alpine:a b",
            "host:port/x",
            "alpine@sha256:abc",
            "alpine@md5:0123456789abcdef0123456789abcdef",
            "registry.io:/x",
            "a b",
            "exa_mple.com/x",
            "[::1/x",
            ":tag",
            "@sha256:0",
        ] {
            let err = Reference::parse(bad).expect_err(bad);
            match &err {
                BoxliteError::InvalidArgument { field, reason } => {
                    assert_eq!(field, "image");
                    assert!(reason.contains(&format!("{bad:?}")), "{reason}");
                }
                other => panic!("{bad}: {other}"),
            }
        }
        let long = format!("a{}", "b".repeat(300));
        assert!(Reference::parse(&long).is_err());
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(Reference::parse(&long_tag).is_err());
        // Only sha256 is stored; other algorithms say so.
        let err = Reference::parse(&format!("a@sha512:{HEX}{HEX}")).unwrap_err();
        assert!(err.to_string().contains("only sha256"), "{err}");
    }

    #[test]
    fn what_oci_spec_alone_would_take_is_still_refused() {
        // Its tag pattern is Unicode-aware; the grammar is ASCII.
        assert!(Reference::parse("alpine:caf\u{e9}").is_err());
        // Its domain is unchecked when the first component also reads as a path.
        assert!(Reference::parse("exa_mple.com/x").is_err());
        assert!(Reference::parse("-bad.example.com/x").is_err());
        // It takes sha512 and uppercase hex; blobs here are sha256, named in lowercase.
        assert!(Reference::parse(&format!("a@sha256:{}", HEX.to_uppercase())).is_err());
        let err = Reference::parse("a@md5:0123456789abcdef0123456789abcdef").unwrap_err();
        assert!(err.to_string().contains(r#"algorithm "md5""#), "{err}");
        // Its length limit is on the repository; ours on the whole name.
        let long = format!("{}.io/{}", "r".repeat(200), "p".repeat(60));
        assert!(Reference::parse(&long).is_err());
    }

    /// Text drawn from the characters references are made of, plus a few that never belong.
    fn reference_like() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::string::string_regex(
            "[a-zA-Z0-9._:/@\\-\\[\\]]{0,40}(@sha256:[0-9a-f]{0,70})?[ \u{e9}\u{0}]?",
        )
        .expect("a valid pattern")
    }

    /// References the grammar accepts, built from its parts.
    fn valid_reference() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        // No '.': a first component with one would be taken for a registry (Docker's rule).
        let component = "[a-z0-9]{1,8}((__|_|-+)[a-z0-9]{1,8}){0,2}";
        let domain = prop_oneof![
            Just(String::new()),
            Just("localhost/".to_string()),
            "[a-z][a-z0-9]{0,8}\\.[a-z]{2,4}(:[0-9]{1,5})?/",
            Just("[::1]:5000/".to_string()),
        ];
        let path = proptest::collection::vec(
            proptest::string::string_regex(component).expect("pattern"),
            1..4,
        )
        .prop_map(|parts| parts.join("/"));
        let tag = prop_oneof![
            Just(String::new()),
            "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}".prop_map(|t| format!(":{t}"))
        ];
        let digest = prop_oneof![
            Just(String::new()),
            "[0-9a-f]{64}".prop_map(|h| format!("@sha256:{h}"))
        ];
        (domain, path, tag, digest).prop_map(|(d, p, t, g)| format!("{d}{p}{t}{g}"))
    }

    fn same(a: &Reference, b: &Reference) -> bool {
        (a.registry(), a.repository(), a.tag(), a.digest())
            == (b.registry(), b.repository(), b.tag(), b.digest())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_text_is_parsed_or_refused_never_a_panic(text in proptest::string::string_regex("(?s).{0,300}").expect("pattern")) {
            if let Err(e) = Reference::parse(&text) {
                proptest::prop_assert_eq!(e.kind(), "invalid_argument");
            }
        }

        #[test]
        fn reference_shaped_text_normalizes_to_a_fixed_point(text in reference_like()) {
            if let Ok(r) = Reference::parse(&text) {
                // The normalized form parses to the same reference (or is refused only for the
                // whole-name length, which normalizing can push over, as with Docker).
                match Reference::parse(&r.to_string()) {
                    Ok(again) => proptest::prop_assert!(same(&r, &again), "{text:?} -> {r} -> {again}"),
                    Err(e) => proptest::prop_assert!(e.to_string().contains("longer than"), "{text:?} -> {r}: {e}"),
                }
                proptest::prop_assert!(r.to_string().is_ascii());
            }
        }

        #[test]
        fn the_grammar_is_accepted_and_mutations_never_panic(
            text in valid_reference(),
            cut in 0usize..80,
            insert in proptest::option::of((0usize..80, proptest::char::any())),
        ) {
            let r = Reference::parse(&text);
            proptest::prop_assert!(r.is_ok(), "{text:?}: {r:?}");
            let mut mutated: Vec<char> = text.chars().collect();
            mutated.truncate(mutated.len().saturating_sub(cut));
            if let Some((at, c)) = insert {
                mutated.insert(at.min(mutated.len()), c);
            }
            let mutated: String = mutated.into_iter().collect();
            let _ = Reference::parse(&mutated);
        }
    }
}
