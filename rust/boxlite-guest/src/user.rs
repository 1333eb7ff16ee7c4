//! Resolving an exec's `user` against the box's /etc/passwd and /etc/group (pure functions).

/// One /etc/passwd line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// One /etc/group line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The credentials a process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, for `setgroups` (includes the primary group).
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    /// A named user or group is not in the box's databases.
    NotFound(String),
    /// The spec is malformed (empty part, too many colons).
    Invalid(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::Invalid(m) => f.write_str(m),
        }
    }
}

pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.trim();
            let _pw = f.next()?;
            let uid = f.next()?.trim().parse().ok()?;
            let gid = f.next()?.trim().parse().ok()?;
            (!name.is_empty()).then(|| PasswdEntry {
                name: name.to_string(),
                uid,
                gid,
            })
        })
        .collect()
}

pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.trim();
            let _pw = f.next()?;
            let gid = f.next()?.trim().parse().ok()?;
            let members = f
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            (!name.is_empty()).then(|| GroupEntry {
                name: name.to_string(),
                gid,
                members,
            })
        })
        .collect()
}

/// Resolves `spec` (`name`, `uid`, `uid:gid`, `name:group`, ... or `None` for root) like
/// runc/Docker do: a numeric uid need not exist (its group is then 0); a name must. Without an
/// explicit group the user's primary group plus every group listing the user as a member
/// become the supplementary groups; with one, only that group.
pub fn resolve(spec: Option<&str>, passwd: &str, group: &str) -> Result<Ids, UserError> {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("0");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Invalid(format!("malformed user {spec:?}")));
    }
    let users = parse_passwd(passwd);
    let (uid, mut gid, name) = match user_part.parse::<u32>() {
        Ok(uid) => match users.iter().find(|u| u.uid == uid) {
            Some(u) => (uid, u.gid, Some(u.name.clone())),
            None => (uid, 0, None),
        },
        Err(_) => match users.iter().find(|u| u.name == user_part) {
            Some(u) => (u.uid, u.gid, Some(u.name.clone())),
            None => {
                return Err(UserError::NotFound(format!(
                    "user {user_part:?} not found in the box's /etc/passwd"
                )))
            }
        },
    };
    let groups_db = parse_group(group);
    let mut groups = Vec::new();
    match group_part {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => match groups_db.iter().find(|e| e.name == g) {
                    Some(e) => e.gid,
                    None => {
                        return Err(UserError::NotFound(format!(
                            "group {g:?} not found in the box's /etc/group"
                        )))
                    }
                },
            };
            groups.push(gid);
        }
        None => {
            groups.push(gid);
            if let Some(name) = &name {
                for e in &groups_db {
                    if e.members.iter().any(|m| m == name) && !groups.contains(&e.gid) {
                        groups.push(e.gid);
                    }
                }
            }
        }
    }
    Ok(Ids { uid, gid, groups })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\n\
        broken line\n\
        bob:x:1001:100::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:root,alice\n\
        users:x:100:\n\
        alice:x:1000:\n\
        audio:x:29:alice , bob\n";

    fn r(spec: Option<&str>) -> Result<Ids, UserError> {
        resolve(spec, PASSWD, GROUP)
    }

    #[test]
    fn parses_databases_skipping_junk() {
        let p = parse_passwd(PASSWD);
        assert_eq!(p.len(), 4);
        assert_eq!(p[2].name, "alice");
        assert_eq!(p[2].uid, 1000);
        let g = parse_group(GROUP);
        assert_eq!(g[4].members, vec!["alice", "bob"]);
        assert_eq!(g[0].members, Vec::<String>::new());
    }

    #[test]
    fn root_by_default_with_its_groups() {
        let ids = r(None).unwrap();
        assert_eq!((ids.uid, ids.gid), (0, 0));
        assert_eq!(ids.groups, vec![0, 10]);
        assert_eq!(r(Some("")).unwrap(), ids);
        assert_eq!(r(Some("root")).unwrap(), ids);
    }

    #[test]
    fn names_and_numbers() {
        let alice = r(Some("alice")).unwrap();
        assert_eq!((alice.uid, alice.gid), (1000, 1000));
        assert_eq!(alice.groups, vec![1000, 10, 29]);
        assert_eq!(r(Some("1000")).unwrap(), alice);
        let bob = r(Some("bob")).unwrap();
        assert_eq!(bob.groups, vec![100, 29]);
        // A numeric uid that is not in passwd is allowed, with group 0.
        let anon = r(Some("4242")).unwrap();
        assert_eq!(
            anon,
            Ids {
                uid: 4242,
                gid: 0,
                groups: vec![0]
            }
        );
    }

    #[test]
    fn explicit_groups() {
        let ids = r(Some("alice:users")).unwrap();
        assert_eq!((ids.uid, ids.gid, ids.groups), (1000, 100, vec![100]));
        let ids = r(Some("1000:29")).unwrap();
        assert_eq!((ids.uid, ids.gid, ids.groups), (1000, 29, vec![29]));
        let ids = r(Some("77:88")).unwrap();
        assert_eq!((ids.uid, ids.gid, ids.groups), (77, 88, vec![88]));
        let ids = r(Some("bob:wheel")).unwrap();
        assert_eq!((ids.uid, ids.gid), (1001, 10));
    }

    #[test]
    fn unknown_and_malformed() {
        assert!(matches!(r(Some("mallory")), Err(UserError::NotFound(_))));
        assert!(matches!(
            r(Some("alice:nogroup")),
            Err(UserError::NotFound(_))
        ));
        assert!(matches!(r(Some(":10")), Err(UserError::Invalid(_))));
        assert!(matches!(r(Some("alice:")), Err(UserError::Invalid(_))));
        assert!(matches!(r(Some("a:b:c")), Err(UserError::Invalid(_))));
        // Empty databases: names fail, numbers work.
        assert!(matches!(
            resolve(Some("root"), "", ""),
            Err(UserError::NotFound(_))
        ));
        assert_eq!(resolve(None, "", "").unwrap().uid, 0);
    }
}
