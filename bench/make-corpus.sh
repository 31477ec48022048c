#!/usr/bin/env bash
# Copied verbatim (apart from this line) from the team's shared bench material, /work/shared/bench/make-corpus.sh (see ANCHORS.md there).
# make-corpus.sh -- build a realistic Nix closure in the local /nix/store without nixpkgs.
#
# Each of ~157 installed Debian packages (the dependency closure of git, python3.11, perl,
# gcc-12, postgresql-15, curl, coreutils, man-db, openssh-client, bash, dash, less, tar, gzip,
# xz-utils, findutils, grep, sed, diffutils) becomes one store path holding that package's
# files (copied from this machine, usr/ prefix stripped: bin/, lib/, share/doc, share/man ...),
# built with builtins.derivation (builder /bin/sh, no sandbox). Debian Depends become Nix
# references: each package writes the store paths of its deps into
# nix-support/propagated-build-inputs (cycles were broken when the table below was made).
# On top: ~45 small Nix-style paths (bin/ wrappers, unit files, /etc files, an etc tree,
# a system-path and one top-level path whose closure is everything).
#
# Idempotent (input-addressed; a re-run rebuilds nothing). Prints the path count and total
# NAR size; the LAST line printed is the top-level store path.
# Env: CORPUS_WORK (default $TMPDIR/nixcached-corpus) holds the generated .nix files and the GC root.
set -euo pipefail
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH
WORK=${CORPUS_WORK:-${TMPDIR:-/tmp}/nixcached-corpus}
mkdir -p "$WORK"

# Static package table, generated once on the rust machine image (2026): "pkg dep dep ...".
# Order: dependencies before dependents.
SPEC=$(cat <<'EOF'
git-man
gcc-12-base
libgcc-s1 gcc-12-base
libc6 libgcc-s1
libbrotli1 libc6
libgmp10 libc6
libnettle8 libc6
libhogweed6 libc6 libgmp10 libnettle8
libunistring2 libc6
libidn2-0 libc6 libunistring2
libffi8 libc6
libp11-kit0 libc6 libffi8
libtasn1-6 libc6
libgnutls30 libc6 libgmp10 libhogweed6 libidn2-0 libnettle8 libp11-kit0 libtasn1-6 libunistring2
libcom-err2 libc6
libkrb5support0 libc6
libk5crypto3 libc6 libkrb5support0
libkeyutils1 libc6
libssl3 libc6
libkrb5-3 libc6 libcom-err2 libk5crypto3 libkeyutils1 libkrb5support0 libssl3
libgssapi-krb5-2 libc6 libcom-err2 libk5crypto3 libkrb5-3 libkrb5support0
libdb5.3 libc6
libsasl2-modules-db libc6 libdb5.3
libsasl2-2 libc6 libsasl2-modules-db
libldap-2.5-0 libc6 libgnutls30 libsasl2-2
libnghttp2-14 libc6
libpsl5 libc6 libidn2-0 libunistring2
zlib1g libc6
librtmp1 libc6 libgmp10 libgnutls30 libhogweed6 libnettle8 zlib1g
libssh2-1 libc6 libssl3 zlib1g
libzstd1 libc6
libcurl3-gnutls libbrotli1 libc6 libgnutls30 libgssapi-krb5-2 libidn2-0 libldap-2.5-0 libnettle8 libnghttp2-14 libpsl5 librtmp1 libssh2-1 libzstd1 zlib1g
libbz2-1.0 libc6
liblzma5 libc6
libmd0 libc6
libpcre2-8-0 libc6
libselinux1 libc6 libpcre2-8-0
libacl1 libc6
tar libacl1 libc6 libselinux1
dpkg libbz2-1.0 libc6 liblzma5 libmd0 libselinux1 libzstd1 tar zlib1g
libcrypt1 libc6
libgdbm6 libc6
libgdbm-compat4 libc6 libgdbm6
perl-base dpkg libc6 libcrypt1
perl-modules-5.36 dpkg perl-base
libperl5.36 libbz2-1.0 libc6 libcrypt1 libdb5.3 libgdbm-compat4 libgdbm6 perl-modules-5.36 zlib1g
perl dpkg libperl5.36 perl-base perl-modules-5.36
liberror-perl perl
libexpat1 libc6
git git-man libc6 libcurl3-gnutls liberror-perl libexpat1 libpcre2-8-0 perl zlib1g
libtinfo6 libc6
libncursesw6 libc6 libtinfo6
libtirpc-common
libtirpc3 libc6 libgssapi-krb5-2 libtirpc-common
libnsl2 libc6 libtirpc3
libpython3.11-minimal libc6 libssl3
readline-common dpkg
libreadline8 libc6 libtinfo6 readline-common
libsqlite3-0 libc6
libuuid1 libc6
media-types
libpython3.11-stdlib libbz2-1.0 libc6 libcrypt1 libdb5.3 libffi8 liblzma5 libncursesw6 libnsl2 libpython3.11-minimal libreadline8 libsqlite3-0 libtinfo6 libtirpc3 libuuid1 media-types
python3.11-minimal libc6 libexpat1 libpython3.11-minimal zlib1g
python3.11 libpython3.11-stdlib media-types python3.11-minimal
binutils-common
libbinutils binutils-common libc6 libzstd1 zlib1g
libctf-nobfd0 libc6 zlib1g
libctf0 libbinutils libc6 zlib1g
libstdc++6 gcc-12-base libc6 libgcc-s1
libgprofng0 libbinutils libc6 libgcc-s1 libstdc++6 zlib1g
libjansson4 libc6
binutils-x86-64-linux-gnu binutils-common libbinutils libc6 libctf-nobfd0 libctf0 libgcc-s1 libgprofng0 libjansson4 libstdc++6 libzstd1 zlib1g
binutils binutils-common binutils-x86-64-linux-gnu libbinutils
libisl23 libc6 libgmp10
libmpfr6 libc6 libgmp10
libmpc3 libc6 libgmp10 libmpfr6
cpp-12 gcc-12-base libc6 libgmp10 libisl23 libmpc3 libmpfr6 libzstd1 zlib1g
libcc1-0 gcc-12-base libc6 libgcc-s1 libstdc++6
libasan8 gcc-12-base libc6 libgcc-s1
libatomic1 gcc-12-base libc6
libgomp1 gcc-12-base libc6
libitm1 gcc-12-base libc6
liblsan0 gcc-12-base libc6 libgcc-s1
libquadmath0 gcc-12-base libc6
libtsan2 gcc-12-base libc6 libgcc-s1
libubsan1 gcc-12-base libc6 libgcc-s1 libstdc++6
libgcc-12-dev gcc-12-base libasan8 libatomic1 libgcc-s1 libgomp1 libitm1 liblsan0 libquadmath0 libtsan2 libubsan1
gcc-12 binutils cpp-12 gcc-12-base libc6 libcc1-0 libgcc-12-dev libgcc-s1 libgmp10 libisl23 libmpc3 libmpfr6 libstdc++6 libzstd1 zlib1g
debconf
libicu72 libc6 libgcc-s1 libstdc++6
libbsd0 libc6 libmd0
libedit2 libbsd0 libc6 libtinfo6
libxml2 libc6 libicu72 liblzma5 zlib1g
libz3-4 libc6 libgcc-s1 libstdc++6
libllvm14 libc6 libedit2 libffi8 libgcc-s1 libstdc++6 libtinfo6 libxml2 libz3-4 zlib1g
liblz4-1 libc6
libaudit-common
libcap-ng0 libc6
libaudit1 libaudit-common libc6 libcap-ng0
libpam0g debconf libaudit1 libc6
libpq5 libc6 libgssapi-krb5-2 libldap-2.5-0 libssl3
libcap2 libc6
libgpg-error0 libc6
libgcrypt20 libc6 libgpg-error0
libsystemd0 libc6 libcap2 libgcrypt20 liblz4-1 liblzma5 libzstd1
libxslt1.1 libc6 libgcrypt20 libxml2
libc-bin libc6
libc-l10n
locales debconf libc-bin libc-l10n
netbase
postgresql-client-common netbase perl
sensible-utils
postgresql-client-15 libc6 liblz4-1 libpq5 libreadline8 libssl3 libzstd1 postgresql-client-common sensible-utils zlib1g
libpam-modules-bin libaudit1 libc6 libcrypt1 libpam0g libselinux1
libpam-modules debconf libaudit1 libc6 libcrypt1 libdb5.3 libpam-modules-bin libpam0g libselinux1
libsemanage-common
libsepol2 libc6
libsemanage2 libaudit1 libbz2-1.0 libc6 libselinux1 libsemanage-common libsepol2
passwd libaudit1 libc6 libcrypt1 libpam-modules libpam0g libselinux1 libsemanage2
adduser passwd
usr-is-merged
init-system-helpers usr-is-merged
libjson-perl perl
openssl libc6 libssl3
ssl-cert adduser debconf openssl
sysvinit-utils libc6
ucf debconf sensible-utils
postgresql-common adduser debconf init-system-helpers libjson-perl perl postgresql-client-common ssl-cert sysvinit-utils ucf
tzdata debconf
postgresql-15 debconf libc6 libgcc-s1 libgssapi-krb5-2 libicu72 libldap-2.5-0 libllvm14 liblz4-1 libpam0g libpq5 libselinux1 libssl3 libstdc++6 libsystemd0 libuuid1 libxml2 libxslt1.1 libzstd1 locales postgresql-client-15 postgresql-common ssl-cert tzdata zlib1g
libcurl4 libbrotli1 libc6 libgssapi-krb5-2 libidn2-0 libldap-2.5-0 libnghttp2-14 libpsl5 librtmp1 libssh2-1 libssl3 libzstd1 zlib1g
curl libc6 libcurl4 zlib1g
libattr1 libc6
coreutils libacl1 libattr1 libc6 libgmp10 libselinux1
libsmartcols1 libc6
bsdextrautils libc6 libsmartcols1 libtinfo6
libuchardet0 libc6 libgcc-s1 libstdc++6
groff-base libc6 libgcc-s1 libstdc++6 libuchardet0
libpipeline1 libc6
libseccomp2 libc6
man-db bsdextrautils debconf groff-base libc6 libgdbm6 libpipeline1 libseccomp2 zlib1g
libcbor0.8 libc6
libudev1 libc6
libfido2-1 libc6 libcbor0.8 libssl3 libudev1 zlib1g
openssh-client adduser libc6 libedit2 libfido2-1 libgssapi-krb5-2 libselinux1 libssl3 passwd zlib1g
mawk libc6
base-files mawk
debianutils libc6
bash base-files debianutils libc6 libtinfo6
dash debianutils dpkg libc6
less libc6 libtinfo6
gzip dpkg libc6
xz-utils libc6 liblzma5
findutils libc6 libselinux1
grep dpkg libc6 libpcre2-8-0
sed libacl1 libc6 libselinux1
diffutils libc6
EOF
)

# --- resolve installed versions; drop (with a warning) packages missing on this machine ----
mapfile -t NAMES < <(printf '%s\n' "$SPEC" | awk '{print $1}')
declare -A VER=()
while read -r p v st; do
  [ "$st" = ii ] || continue
  v=${v#*:}            # strip epoch
  v=${v//[^A-Za-z0-9+._-]/_}
  VER[$p]=$v
done < <(dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\n' "${NAMES[@]}" 2>/dev/null || true)
missing=0
{
  echo "["
  while read -r p deps; do
    if [ -z "${VER[$p]:-}" ]; then echo "make-corpus: warning: $p not installed, skipped" >&2; missing=$((missing+1)); continue; fi
    d=""
    for x in $deps; do [ -n "${VER[$x]:-}" ] && d="$d \"$x\""; done
    printf '  { n = "%s"; v = "%s"; d = [%s ]; }\n' "$p" "${VER[$p]}" "$d"
  done <<< "$SPEC"
  echo "]"
} > "$WORK/spec.nix.tmp"
mv "$WORK/spec.nix.tmp" "$WORK/spec.nix"
[ "$missing" -eq 0 ] || echo "make-corpus: $missing package(s) missing: corpus differs from the reference one" >&2

cat > "$WORK/corpus.nix" <<'EOF'
let
  spec = import ./spec.nix;
  system = builtins.currentSystem;
  mk = name: script: attrs: builtins.derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-ec" script ];
    PATH = "/usr/bin:/bin";
  } // attrs);

  # One store path per Debian package: its files, usr/ prefix stripped, plus references.
  debScript = ''
    mkdir -p "$out/nix-support"
    dpkg-query -L "$debPackage" | while IFS= read -r f; do
      case "$f" in /*/*) ;; *) continue ;; esac  # skip non-paths and usrmerge /lib,/bin links
      if [ -L "$f" ] || [ -f "$f" ]; then printf '%s\n' "$f"; fi
    done | sed 's,^/,,' > "$NIX_BUILD_TOP/files"
    if [ -s "$NIX_BUILD_TOP/files" ]; then
      tar -C / --no-recursion --verbatim-files-from --mode=ug-s,o-t -T "$NIX_BUILD_TOP/files" -cf - \
        | tar -C "$out" --transform 's,^usr/,,S' -xf -
    fi
    for d in $deps; do printf '%s\n' "$d"; done > "$out/nix-support/propagated-build-inputs"
    printf '%s %s\n' "$debPackage" "$debVersion" > "$out/nix-support/debian-package"
  '';
  pkgs = builtins.listToAttrs (map (p: {
    name = p.n;
    value = mk "${p.n}-${p.v}" debScript {
      debPackage = p.n; debVersion = p.v;
      deps = map (d: pkgs.${d}) p.d;
    };
  }) spec);

  has = n: builtins.hasAttr n pkgs;
  roots = builtins.filter has [ "git" "python3.11" "perl" "gcc-12" "postgresql-15" "curl"
    "coreutils" "man-db" "openssh-client" "bash" "dash" "less" "tar" "gzip" "xz-utils"
    "findutils" "grep" "sed" "diffutils" ];
  # every package nobody else depends on, so the top-level closure is everything
  depended = builtins.concatMap (p: p.d) spec;
  sources = builtins.filter (n: !(builtins.elem n depended) && !(builtins.elem n roots))
    (map (p: p.n) (builtins.filter (p: has p.n) spec));
  bash = pkgs.bash; coreutils = pkgs.coreutils;

  # Small paths: bin/ wrappers (shebang + exec into the package), like makeWrapper output.
  wrapper = r: mk "${r}-wrapped" ''
    mkdir -p "$out/bin"
    n=0
    for f in "$pkg"/bin/* "$pkg"/sbin/* "$pkg"/lib/postgresql/*/bin/*; do
      [ -f "$f" ] || continue
      b=$(basename "$f")
      printf '#!%s/bin/bash -e\nexport PATH="%s/bin:%s/bin:$PATH"\nexec -a "$0" "%s" "$@"\n' \
        "$bash" "$pkg" "$coreutils" "$f" > "$out/bin/$b"
      chmod +x "$out/bin/$b"
      n=$((n+1)); [ $n -lt 40 ] || break
    done
  '' { pkg = pkgs.${r}; inherit bash coreutils; };
  wrappers = map wrapper roots;

  # Small paths: systemd-unit-like files referencing wrappers and tools.
  unit = r: w: mk "unit-${r}.service" ''
    mkdir -p "$out"
    exe=$(ls "$w/bin" | head -n1)
    cat > "$out/$unitName" <<UNIT
    [Unit]
    Description=anchor corpus service for $unitName
    [Service]
    Environment="PATH=$coreutils/bin:$grep/bin:$sed/bin"
    ExecStartPre=$bash/bin/bash -c 'test -x $w/bin/$exe'
    ExecStart=$w/bin/$exe --version
    UNIT
  '' { inherit w bash coreutils; grep = pkgs.grep or coreutils; sed = pkgs.sed or coreutils;
       unitName = "${r}.service"; };
  units = builtins.genList (i: unit (builtins.elemAt roots i) (builtins.elemAt wrappers i))
    (builtins.length roots);

  # Small leaf paths: copies of real /etc files of this machine.
  etcFile = f: mk "etc-${f}" ''
    if [ -f "/etc/$f" ]; then cp "/etc/$f" "$out"; else echo "# $f" > "$out"; fi
  '' { inherit f; };
  etcFiles = map etcFile [ "services" "protocols" "login.defs" "nsswitch.conf"
    "bash.bashrc" "inputrc" "profile" "ethertypes" ];

  etc = mk "etc" ''
    mkdir -p "$out/etc/systemd/system"
    for u in $units; do for f in "$u"/*; do ln -s "$f" "$out/etc/systemd/system/"; done; done
    for f in $etcFiles; do ln -s "$f" "$out/etc/$(echo "$f" | sed 's,^[^-]*-etc-,,')"; done
  '' { inherit units etcFiles; };

  systemPath = mk "system-path" ''
    mkdir -p "$out/bin" "$out/nix-support"
    for w in $wrappers; do for f in "$w"/bin/*; do [ -e "$f" ] || continue; ln -sf "$f" "$out/bin/"; done; done
    for p in $roots $sources; do printf '%s\n' "$p"; done > "$out/nix-support/packages"
  '' { inherit wrappers; roots = map (r: pkgs.${r}) roots; sources = map (n: pkgs.${n}) sources; };

in mk "anchor-system" ''
  mkdir -p "$out"
  ln -s "$systemPath" "$out/sw"
  ln -s "$etc/etc" "$out/etc"
  printf '#!%s/bin/bash\nexport PATH=%s/bin\necho activating %s\n' "$bash" "$systemPath" "$out" > "$out/activate"
  chmod +x "$out/activate"
'' { inherit systemPath etc bash; }
EOF

nix-build "$WORK/corpus.nix" -o "$WORK/result" --max-jobs 2 --cores 1 --quiet --no-build-output >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; exit 1; }
TOP=$(readlink -f "$WORK/result")
nix path-info -r --json "$TOP" > "$WORK/closure.json"
python3 - "$WORK/closure.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
items = d if isinstance(d, list) else [dict(v, path=k) for k, v in d.items()]
n = len(items); s = sum(i["narSize"] for i in items)
big = sorted(items, key=lambda i: -i["narSize"])
print(f"paths: {n}")
print(f"total NAR size: {s} bytes ({s/2**20:.1f} MiB)")
print(f"largest: " + ", ".join(f'{i["path"][44:]}={i["narSize"]/2**20:.1f}MiB' for i in big[:5]))
print(f"paths < 64 KiB: {sum(i['narSize'] < 65536 for i in items)}, >= 10 MiB: {sum(i['narSize'] >= 10*2**20 for i in items)}")
EOF
echo "$TOP"
