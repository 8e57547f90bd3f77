//! Reading ChimeraModule manifests from files and directories: the one loader the CLI and
//! `chimera up` share (every `*.yaml` / `*.yml` of a directory, in name order).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::ChimeraModule;
use super::validation::modules_from_yaml;

/// A manifest path could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub struct ManifestError {
    /// The file or directory.
    pub path: PathBuf,
    /// What the file system said.
    pub source: std::io::Error,
}

/// The files `paths` name: a file as it is, a directory's YAML files sorted by name.
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ManifestError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| ManifestError {
                path: path.clone(),
                source,
            })?;
            let mut inside: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Every module of a set of manifests, the problems found (each prefixed with its file), and
/// when each file last changed.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The valid modules, in file order.
    pub modules: Vec<ChimeraModule>,
    /// `<file>: <problem>` for every invalid document.
    pub problems: Vec<String>,
    /// Each file and its modification time (for reloads).
    pub files: Vec<(PathBuf, SystemTime)>,
}

/// Reads the modules of `paths`.
pub fn load(paths: &[PathBuf]) -> Result<Loaded, ManifestError> {
    let mut loaded = Loaded::default();
    for file in yaml_files(paths)? {
        let (text, modified) = read(&file)?;
        let (found, bad) = modules_from_yaml(&text);
        loaded
            .problems
            .extend(bad.into_iter().map(|p| format!("{}: {p}", file.display())));
        loaded.modules.extend(found);
        loaded.files.push((file, modified));
    }
    Ok(loaded)
}

/// A file's text and modification time.
pub fn read(file: &Path) -> Result<(String, SystemTime), ManifestError> {
    let err = |source| ManifestError {
        path: file.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(file).map_err(err)?;
    let modified = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((text, modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_gives_its_yaml_files_in_order_and_each_problem_its_file() {
        let dir = std::env::temp_dir().join(format!("chimera-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let module = |name: &str| {
            format!(
                "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {{name: {name}}}\nspec: {{image: x/y:1, worker: {{}}}}\n"
            )
        };
        for (file, text) in [
            ("b.yaml", module("bravo")),
            ("a.yml", module("alpha")),
            ("notes.txt", "not yaml".to_owned()),
            ("c.yaml", "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: Bad_Name}\nspec: {image: x}\n".to_owned()),
        ] {
            std::fs::write(dir.join(file), text).unwrap_or_else(|e| panic!("{e}"));
        }
        let files = yaml_files(std::slice::from_ref(&dir)).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<_> = files
            .iter()
            .filter_map(|f| f.file_name()?.to_str())
            .collect();
        assert_eq!(names, ["a.yml", "b.yaml", "c.yaml"]);
        let loaded = load(std::slice::from_ref(&dir)).unwrap_or_else(|e| panic!("{e}"));
        let modules: Vec<_> = loaded
            .modules
            .iter()
            .filter_map(|m| m.metadata.name.clone())
            .collect();
        assert_eq!(modules, ["alpha", "bravo"]);
        assert!(
            !loaded.problems.is_empty() && loaded.problems.iter().all(|p| p.contains("c.yaml")),
            "{:?}",
            loaded.problems
        );
        assert_eq!(loaded.files.len(), 3);
        let missing = load(&[dir.join("nope.yaml")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(missing.contains("nope.yaml"), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
