-- The seed server's `mail` database, as the classic Postfix + MySQL virtual-users tutorials
-- (workaround.org, HowtoForge "Virtual Users And Domains With Postfix, Courier/Dovecot, MySQL")
-- create it: Postfix's virtual_mailbox_domains / virtual_alias_maps / virtual_mailbox_maps /
-- transport_maps read these tables through the mail_admin account. Loaded as root by the
-- `mariadb` fixture (tests/conftest.py) into a private instance.
--
-- Differences from the tutorials: mail_admin gets SELECT only (they grant INSERT, UPDATE and
-- DELETE too, for a web admin tool), and only the two domains below are inserted.

CREATE DATABASE mail;
USE mail;

CREATE TABLE domains (
  domain varchar(50) NOT NULL,
  PRIMARY KEY (domain)
) ENGINE=MyISAM;

CREATE TABLE forwardings (
  source varchar(80) NOT NULL,
  destination TEXT NOT NULL,
  PRIMARY KEY (source)
) ENGINE=MyISAM;

CREATE TABLE users (
  email varchar(80) NOT NULL,
  password varchar(20) NOT NULL,
  quota INT(10) DEFAULT '10485760',
  PRIMARY KEY (email)
) ENGINE=MyISAM;

CREATE TABLE transport (
  domain varchar(128) NOT NULL default '',
  transport varchar(128) NOT NULL default '',
  UNIQUE KEY domain (domain)
) ENGINE=MyISAM;

CREATE USER 'mail_admin'@'localhost' IDENTIFIED BY 'mail_admin_password';
CREATE USER 'mail_admin'@'127.0.0.1' IDENTIFIED BY 'mail_admin_password';
GRANT SELECT ON mail.* TO 'mail_admin'@'localhost';
GRANT SELECT ON mail.* TO 'mail_admin'@'127.0.0.1';

INSERT INTO domains (domain) VALUES ('example.com'), ('example.org');
