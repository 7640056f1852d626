"""mwjax/instrument"""
