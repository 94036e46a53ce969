//! Certificates made in the test: a CA, server and client certificates (rcgen), so TLS and mutual
//! TLS are tested for real without files checked into the repository.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("ca cert"),
        }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate for a calling system named by `dns_name`.
    pub fn client(&self, dns_name: &str) -> Leaf {
        self.leaf(&[dns_name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// `[server.tls]` for a face served with a server certificate of `ca` that asks for client
/// certificates of `ca` (no calling systems listed: the face's settings name them). The PEM
/// files are written to a fresh temporary folder.
pub fn server_tls(ca: &TestCa) -> carerecord_broker::config::TlsConfig {
    let server = ca.server();
    let dir = crate::temp_path("tls");
    std::fs::create_dir_all(&dir).expect("a folder for the PEM files");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path
    };
    carerecord_broker::config::TlsConfig {
        cert: write("server.pem", &server.cert_pem),
        key: write("server.key", &server.key_pem),
        client_ca: Some(write("ca.pem", &ca.cert_pem())),
        systems: Vec::new(),
    }
}

/// An HTTPS client that trusts only `ca`, presenting `leaf` as its client certificate when
/// given. Redirects are not followed.
pub fn https_client(
    ca: &TestCa,
    leaf: Option<&Leaf>,
    timeout: std::time::Duration,
) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).expect("ca")])
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout);
    if let Some(leaf) = leaf {
        builder = builder.identity(
            reqwest::Identity::from_pem(format!("{}{}", leaf.cert_pem, leaf.key_pem).as_bytes())
                .expect("identity"),
        );
    }
    builder.build().expect("client")
}
