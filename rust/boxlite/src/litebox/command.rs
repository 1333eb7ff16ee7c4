//! What an exec runs: the box's default command, and a command's environment, working
//! directory and user with the image's and the box's defaults applied.

use boxlite_proto::{ExecRequest, TtySize};

use crate::error::{BoxliteError, BoxliteResult};
use crate::exec::BoxCommand;
use crate::images::{merge_env, ImageConfig};
use crate::options::BoxOptions;
use crate::units::Seconds;

/// A terminal size for default commands of `tty` boxes when the caller gives none.
const DEFAULT_TTY: TtySize = TtySize { rows: 24, cols: 80 };

/// Docker's rule: a box `entrypoint` replaces the image's ENTRYPOINT and drops its CMD; a box
/// `cmd` replaces the CMD.
pub(super) fn default_argv(options: &BoxOptions, image: &ImageConfig) -> Vec<String> {
    let (entrypoint, cmd) = match (&options.entrypoint, &options.cmd) {
        (Some(entrypoint), cmd) => (entrypoint.clone(), cmd.clone().unwrap_or_default()),
        (None, Some(cmd)) => (image.entrypoint.clone(), cmd.clone()),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    };
    entrypoint.into_iter().chain(cmd).collect()
}

pub(super) fn default_exec(
    options: &BoxOptions,
    image: &ImageConfig,
    extra_args: Vec<String>,
    tty: Option<TtySize>,
) -> BoxliteResult<BoxCommand> {
    let mut argv = default_argv(options, image).into_iter();
    let Some(program) = argv.next() else {
        return Err(BoxliteError::invalid(
            "cmd",
            "no command given, and the box has no default (its image sets no ENTRYPOINT or CMD \
             and the box options none)",
        ));
    };
    let mut command = BoxCommand::new(program).args(argv).args(extra_args);
    command.tty = tty.or(options.tty.then_some(DEFAULT_TTY));
    Ok(command)
}

/// The request the guest runs: environment merged (image, then box, then command), working
/// directory and user from the command, else the box, else the image.
pub(super) fn request(
    command: &BoxCommand,
    options: &BoxOptions,
    image: &ImageConfig,
) -> ExecRequest {
    let env = merge_env(&merge_env(&image.env, &options.env), &command.env);
    let cwd = command
        .cwd
        .clone()
        .or_else(|| options.working_dir.clone())
        .or_else(|| image.working_dir.clone());
    let user = command
        .user
        .clone()
        .or_else(|| options.user.clone())
        .or_else(|| image.user.clone());
    ExecRequest {
        program: command.program.clone(),
        args: command.args.clone(),
        env,
        cwd,
        user,
        tty: command.tty,
        timeout_ms: command.timeout.map(Seconds::as_millis),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            env: vec![("PATH".into(), "/bin".into()), ("A".into(), "image".into())],
            entrypoint: vec!["/init".into()],
            cmd: vec!["serve".into(), "--port=80".into()],
            working_dir: Some("/srv".into()),
            user: Some("www".into()),
            ..ImageConfig::default()
        }
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn default_command_follows_docker() {
        let plain = BoxOptions::default();
        assert_eq!(
            default_argv(&plain, &image()),
            strings(&["/init", "serve", "--port=80"])
        );
        let new_cmd = BoxOptions {
            cmd: Some(strings(&["debug"])),
            ..BoxOptions::default()
        };
        assert_eq!(
            default_argv(&new_cmd, &image()),
            strings(&["/init", "debug"])
        );
        let new_entrypoint = BoxOptions {
            entrypoint: Some(strings(&["sh", "-c"])),
            ..BoxOptions::default()
        };
        assert_eq!(
            default_argv(&new_entrypoint, &image()),
            strings(&["sh", "-c"]),
            "a new entrypoint drops the image's CMD"
        );
        let both = BoxOptions {
            entrypoint: Some(strings(&["sh", "-c"])),
            cmd: Some(strings(&["echo hi"])),
            ..BoxOptions::default()
        };
        assert_eq!(
            default_argv(&both, &image()),
            strings(&["sh", "-c", "echo hi"])
        );
        assert!(default_argv(&plain, &ImageConfig::default()).is_empty());
    }

    #[test]
    fn default_exec_adds_args_and_the_box_terminal() {
        let tty_box = BoxOptions {
            tty: true,
            ..BoxOptions::default()
        };
        let command = default_exec(&tty_box, &image(), strings(&["-v"]), None).unwrap();
        assert_eq!(command.program, "/init");
        assert_eq!(command.args, strings(&["serve", "--port=80", "-v"]));
        assert_eq!(command.tty, Some(DEFAULT_TTY));
        let sized = TtySize {
            rows: 50,
            cols: 120,
        };
        let command = default_exec(&tty_box, &image(), vec![], Some(sized)).unwrap();
        assert_eq!(command.tty, Some(sized));
        let err = default_exec(
            &BoxOptions::default(),
            &ImageConfig::default(),
            vec![],
            None,
        )
        .unwrap_err();
        assert!(matches!(err, BoxliteError::InvalidArgument { ref field, .. } if field == "cmd"));
    }

    #[test]
    fn command_then_box_then_image() {
        let options = BoxOptions {
            env: vec![("A".into(), "box".into()), ("B".into(), "box".into())],
            working_dir: Some("/box".into()),
            ..BoxOptions::default()
        };
        let request = request(
            &BoxCommand::new("sh").env("B", "command").user("root"),
            &options,
            &image(),
        );
        assert_eq!(
            request.env,
            vec![
                ("PATH".to_owned(), "/bin".to_owned()),
                ("A".to_owned(), "box".to_owned()),
                ("B".to_owned(), "command".to_owned())
            ]
        );
        assert_eq!(request.cwd.as_deref(), Some("/box"));
        assert_eq!(request.user.as_deref(), Some("root"));
        let bare = super::request(&BoxCommand::new("sh"), &BoxOptions::default(), &image());
        assert_eq!(
            (bare.cwd.as_deref(), bare.user.as_deref()),
            (Some("/srv"), Some("www"))
        );
    }
}
